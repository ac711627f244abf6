"""Peak memory and throughput of sample, one train step and evaluate on a LLaVA-Med-7B-shaped model.

The model is benchmarks/shapes.py's random-weight LLaVA-Med v1.5 shape (Mistral-7B language
model, CLIP ViT-L/14 at 336 px, 576 visual tokens). The rows are N phantom VQA rows with one-word
answers and J = 3 ranked wrong answers each (`train_throughput.make_rows`). Three phases, each
measured on its own (peaks reset before it; by default each in a fresh process on a CPU):

- `sample`: the `sample` stage's HSCR sampler, `pipeline.self_contrast.sample_batch` (two views,
  visual tokens dropped after the projector at mask_ratio 0.7, the graded candidates scored under
  the full image), `--batch-size` entries per batch, the rest of `sample:` from params.yaml.
- `train_step`: one optimizer step of the `train` stage's preference step (MLPO with LoRA,
  `GroupedScorer(share_prompt=True)`, the code `train_vs_trl.py`'s `ours_mlpo` runs:
  `train_vs_trl.GroupedStep`) on `--batch-size` entries, after the reference table's pass (timed
  apart). The LoRA weights are compared before and after the step.
- `evaluate`: `pipeline.evaluation.predict`, left-padded batches of `--batch-size` questions,
  KV-cached greedy decoding with `evaluate.max_new_tokens`.

Peak memory: on a GPU `torch.cuda.max_memory_allocated` and `max_memory_reserved`, reset before
the phase; on a CPU the process's peak resident set (`VmHWM`), reset before the phase through
/proc/self/clear_refs, so it is the phase's peak with the model loaded.

    python benchmarks/memory_7b.py --model llava-med-7b --mixed-precision bf16   # a GPU (~15 GB of weights)
    python benchmarks/memory_7b.py --model llava-med-7b:layers=1 --entries 2     # CPU: every width, 1 layer

Adds the run to reports/benchmarks/memory_7b.json under `runs["<model>/<device>"]` and prints it.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import (  # noqa: E402
    pick_device,
    proc_status_mib,
    run_header,
    run_isolated,
    save_run,
    synchronize,
)
from benchmarks.shapes import build_llava_med_shape, is_shape, parameters  # noqa: E402
from benchmarks.train_throughput import make_rows  # noqa: E402
from benchmarks.train_vs_trl import GroupedStep, preference_config  # noqa: E402

app = typer.Typer(add_completion=False)
PHASES = ("sample", "train_step", "evaluate")
MASK_RATIO = 0.7  # HSCR's visual-token dropout rate, the setting (also params.yaml's)
REJECTED = 3  # J ranked wrong answers per training entry, params.yaml train.max_rejected


def precision(mixed_precision: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weight dtype, bf16 autocast) for `--mixed-precision`; auto is the pipeline's rule
    (`pipeline.device.use_bf16`: bf16 on a GPU that has it, else float32)."""
    from pipeline.device import use_bf16

    if mixed_precision == "auto":
        mixed_precision = "bf16" if use_bf16(device) else "no"
    if mixed_precision == "bf16":
        return torch.bfloat16, True
    if mixed_precision == "no":
        return torch.float32, False
    raise typer.BadParameter(f"--mixed-precision must be auto, bf16 or no, got {mixed_precision!r}")


def reset_peak(device: torch.device) -> None:
    """Start the phase's peak at what is resident now (model and rows loaded)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # "5" resets the process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0, proc(5)).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then also covers the model build; `peak_rss_reset` says so


def phase_memory(device: torch.device, before: dict) -> dict:
    if device.type == "cuda":
        return {**before, "cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "cuda_max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    return {**before, "peak_rss_mib": proc_status_mib("VmHWM")}


def memory_now(device: torch.device) -> dict:
    out = {"rss_before_phase_mib": round(proc_status_mib("VmRSS"), 1)}
    if device.type == "cuda":
        out["cuda_memory_allocated_before_phase_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return out


def timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _sample(vlm: Any, rows: list[dict], settings: dict, device: torch.device, autocast: Any) -> dict:
    from pipeline.params import project_config
    from pipeline.self_contrast import SampleConfig, sample_batch

    cfg = project_config(SampleConfig, "sample", mode="replace", mask_strategy="token", source="self",
                         mask_ratio=MASK_RATIO)
    if settings["warmup"]:
        with autocast:
            sample_batch(vlm, rows[:1], cfg)
    before = memory_now(device)
    reset_peak(device)

    def run() -> list[dict]:
        out = []
        with autocast:
            for part in _batches(len(rows), settings["batch_size"]):
                out += sample_batch(vlm, rows[part], cfg)
        return out

    out, seconds = timed(run, device)
    candidates = sum(len(r["candidates"]) for r in out)
    return {"seconds": seconds, "entries": len(rows), "entries_per_second": len(rows) / seconds,
            "candidates": candidates, "candidates_per_second": candidates / seconds,
            "mask_ratio": cfg.mask_ratio, "mask_strategy": cfg.mask_strategy, "mode": cfg.mode, "k": cfg.k,
            **phase_memory(device, before)}


def _train_step(vlm: Any, rows: list[dict], settings: dict, device: torch.device, autocast: Any) -> dict:
    cfg = preference_config()
    batch_entries = min(settings["batch_size"], len(rows))
    before = memory_now(device)
    reset_peak(device)  # LoRA, the optimizer and the reference table are part of the step's memory
    grouped = GroupedStep(vlm, rows, cfg, batch_entries, device, autocast, adapter_seed=None)
    _, reference_seconds = timed(grouped.reference_pass, device)
    grouped.train_mode()
    batch = grouped.batch(grouped.schedule[0])
    lora_before = [p.detach().clone() for p in grouped.params]
    out, seconds = timed(lambda: grouped.step("ours_mlpo", batch), device)
    vlm.model.eval()
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(grouped.params, lora_before, strict=True))
    entries = len(grouped.schedule[0])
    return {"seconds_per_step": seconds, "entries_per_step": entries, "entries_per_second": entries / seconds,
            "rejected_per_entry": grouped.j, "loss": "mlpo", "step_loss": float(out.loss.detach()),
            "seconds_reference_pass": reference_seconds, "seconds_tokenize": grouped.tokenize_seconds,
            "lora_parameters": sum(p.numel() for p in grouped.params), "lora_max_abs_change": change,
            "lora_weights_changed": change > 0, **phase_memory(device, before)}


def _evaluate(vlm: Any, rows: list[dict], settings: dict, device: torch.device, autocast: Any) -> dict:
    from pipeline.evaluation import EvaluateConfig, predict
    from pipeline.params import project_config

    cfg = project_config(EvaluateConfig, "evaluate")
    if settings["warmup"]:
        with autocast:
            predict(vlm, rows[:1], 1, cfg.max_new_tokens, desc="warm-up")
    before = memory_now(device)
    reset_peak(device)

    def run() -> list[str]:
        with autocast:
            return predict(vlm, rows, settings["batch_size"], cfg.max_new_tokens, desc="evaluate")

    answers, seconds = timed(run, device)
    return {"seconds": seconds, "questions": len(answers), "questions_per_second": len(answers) / seconds,
            "max_new_tokens": cfg.max_new_tokens.to_dict(), **phase_memory(device, before)}


PHASE_RUNNERS = {"sample": _sample, "train_step": _train_step, "evaluate": _evaluate}


def _prepare(settings: dict) -> tuple[Any, list[dict], torch.device, Any, float]:
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = pick_device(settings["device"])
    dtype, bf16 = precision(settings["mixed_precision"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    rows = make_rows(settings["entries"], REJECTED, seed=0)
    start = time.perf_counter()
    vlm = build_llava_med_shape(settings["model"], device, dtype)
    return vlm, rows, device, autocast, time.perf_counter() - start


def run_phase(phase: str, settings: dict) -> dict:
    """Build the model and the rows, then run one phase (module level, for `machine.run_isolated`)."""
    vlm, rows, device, autocast, build_seconds = _prepare(settings)
    out = PHASE_RUNNERS[phase](vlm, rows, settings, device, autocast)
    return {"seconds_model_build": build_seconds, **out}


def run_in_process(settings: dict) -> dict[str, dict]:
    """Every phase on one model build (the tests: a build of the full-width model is seconds on a
    CPU). The train step goes last because it wraps the model in LoRA; the others leave it as built."""
    vlm, rows, device, autocast, build_seconds = _prepare(settings)
    out = {}
    for phase in ("sample", "evaluate", "train_step"):
        out[phase] = {"seconds_model_build": build_seconds, **PHASE_RUNNERS[phase](vlm, rows, settings, device,
                                                                                    autocast)}
    return {phase: out[phase] for phase in PHASES}


def measure(model: str, entries: int, batch_size: int, mixed_precision: str, device: str, threads: int,
            warmup: bool, isolated: bool) -> dict:
    if not is_shape(model):
        raise typer.BadParameter(f"--model must be llava-med-7b or llava-med-7b:layers=N, got {model!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dtype, bf16 = precision(mixed_precision, dev)
    settings = {"model": model, "entries": entries, "batch_size": batch_size, "mixed_precision": mixed_precision,
                "device": str(dev), "threads": threads, "warmup": warmup}
    if isolated:
        phases = {}
        for phase in PHASES:
            typer.echo(f"{phase} ...", err=True)
            phases[phase] = run_isolated(run_phase, phase, settings)
    else:
        phases = run_in_process(settings)
    # Parameter counts need only the architecture: a meta-device build allocates nothing.
    shape = build_llava_med_shape(model, torch.device("meta"), dtype)
    text = sum(p.numel() for p in shape.model.model.language_model.parameters())
    vision = sum(p.numel() for p in shape.model.model.vision_tower.parameters())
    return {
        "model": model,
        **run_header(dev, dtype),
        "autocast": "bf16" if bf16 else None,
        "mixed_precision": mixed_precision,
        "entries": entries,
        "batch_size": batch_size,
        "warmup": warmup,
        "isolated_processes": isolated,
        "peak_memory": ("torch.cuda.max_memory_allocated / max_memory_reserved, reset before each phase"
                        if dev.type == "cuda" else
                        "peak RSS (VmHWM), reset to the current RSS before each phase (/proc/self/clear_refs), "
                        "model loaded" + (", each phase in a fresh process" if isolated else
                                           ", one process (sample, evaluate, then the train step)")),
        "parameters": {"total": parameters(shape), "language_model": text, "vision_tower": vision,
                       "lm_head": shape.model.lm_head.weight.numel(),
                       "lora": phases["train_step"]["lora_parameters"]},
        "visual_tokens": shape.settings.num_image_tokens,
        "phases": phases,
    }


@app.command()
def main(
    model: str = typer.Option("llava-med-7b", help="llava-med-7b (the full shape, ~15 GB of bf16 weights: a GPU) | "
                              "llava-med-7b:layers=N (every width, N language and N vision layers)"),
    entries: int = typer.Option(8, min=1, help="N phantom rows each phase runs on"),
    batch_size: int = typer.Option(4, min=1, help="entries per sampling batch, per train step, per decoding batch"),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 on a GPU that has it, else no) | bf16 (bf16 "
                                        "weights and bf16 autocast) | no (float32)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    threads: int = typer.Option(1, help="torch CPU threads; 0 keeps torch's default"),
    warmup: bool = typer.Option(True, help="run sample and evaluate once on one entry before timing them"),
    isolated: bool = typer.Option(None, help="each phase in its own process (default: on a CPU, where the peak "
                                  "RSS is per process; on a GPU the peaks are reset in one process)",
                                  show_default=False),
    output: Path = typer.Option(ROOT / "reports" / "benchmarks" / "memory_7b.json", "--output", "--out",
                                help="report file (runs merged)"),
) -> dict:
    """Peak memory and throughput of sample, one train step and evaluate on the LLaVA-Med-7B shape."""
    if isolated is None:
        isolated = pick_device(device).type == "cpu"
    report = measure(model, entries, batch_size, mixed_precision, device, threads, warmup, isolated)
    save_run("memory_7b", f"{model}/{pick_device(device).type}", report, out=output)
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    app()
