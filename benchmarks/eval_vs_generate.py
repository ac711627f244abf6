"""Evaluation throughput: our batched, KV-cached greedy decoding against transformers' `generate`
one question at a time, the shape of LLaVA-Med's evaluation loop.

LLaVA-Med's `llava/eval/model_vqa.py` answers one question at a time:
`model.generate(input_ids, images=..., do_sample=False, max_new_tokens=...)`. The baseline here is
that loop on transformers' own `LlavaForConditionalGeneration.generate` (batch of one, so no
padding), greedy, stopping at the same end-of-turn token; ours is `pipeline.evaluation.predict`
with `evaluate.batch_size` and `evaluate.max_new_tokens` from params.yaml. Both see the same test
rows, the same model and the same prompts (`VLM.prompt_ids`), and both times include building the
prompt and processing the image.

The answers must be identical, question for question: the run fails at the first difference
(faster must not mean different). Two differences between the paths that do not change a token:

- our `VLM.embed` looks up the pad token's embedding for the image placeholder and transformers
  looks up the placeholder's own row; both are overwritten by the image features before the
  language model sees them;
- our positions count attended tokens (`position_ids_from_mask`); for a left-padded row that is
  the same as transformers' `cumsum - 1` over the attention mask at every attended position, and a
  batch of one has no padding at all.

FLOPs are counted (torch's FlopCounterMode, `benchmarks/machine.py`): over the whole run for the
batched path (its padding and early stops depend on the batches), on a seeded sample of 128
questions for `generate` (each question's work is its own), then set against the measured matmul
peak. LLaVA-Med's `model_vqa.py` samples at temperature 0.2 by default; the loop here is its
greedy setting (`--temperature 0`), the one whose answers can be compared token for token.

    python benchmarks/eval_vs_generate.py [--model models/sft|demo|tiny] [--questions 64] [--threads 1]

Adds the run to reports/benchmarks/eval_vs_generate.json under `runs["<model>/<device>"]` and prints it.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import (  # noqa: E402
    ROOT,
    count_flops,
    matmul_peak,
    pick_device,
    run_header,
    save_run,
    speedup_verdict,
    synchronize,
    utilization,
)
from shapes import build_llava_med_shape, is_shape  # noqa: E402

from pipeline.data.images import decode_image  # noqa: E402
from pipeline.evaluation import EvaluateConfig, MaxNewTokens, predict  # noqa: E402
from pipeline.models.vlm import VLM  # noqa: E402
from pipeline.params import project_config  # noqa: E402

app = typer.Typer(add_completion=False)
FLOP_SAMPLE = 128  # questions generate's FLOPs are counted on
SPEEDUP_TARGET = 5.0


class PredictionMismatch(AssertionError):
    """The two paths answered a question differently."""


# ----- shared with benchmarks/sample_vs_generate.py --------------------------------------------------


def load_rows(split: str, limit: int | None) -> tuple[list[dict], str]:
    """The prepared split (`data/prepared/<split>.parquet`) when it exists, else phantom rows made
    with the `prepare.phantom` settings (all `n_<split>` of them, or only `limit`). At most `limit`."""
    from pipeline.data.phantoms import generate_dataset
    from pipeline.data.prepare import PrepareConfig
    from pipeline.schema import VQA_SCHEMA, read_rows

    path = ROOT / "data" / "prepared" / f"{split}.parquet"
    if path.exists():
        rows, source = read_rows(path, VQA_SCHEMA), str(path.relative_to(ROOT))
    else:
        prep = project_config(PrepareConfig, "prepare")
        total = prep.phantom.n_test if split == "test" else prep.phantom.n_train
        n = total if limit is None else min(limit, total)
        train, test = generate_dataset(n if split == "train" else 0, n if split == "test" else 0, prep.seed,
                                       prep.phantom.prior, prep.phantom.image_size)
        rows, source = (test if split == "test" else train), f"phantom {split} rows (generate_dataset, {n})"
    return (rows if limit is None else rows[:limit]), source


def load_model(model: str, rows: list[dict], device: torch.device, dtype: str) -> tuple[VLM, str]:
    """`tiny` (built, its tokenizer over the rows' words), `demo` (built, untrained) or a model folder.

    `models/sft` without a config.json falls back to `demo`. dtype `auto` is the pipeline's
    (float32 on a CPU, bf16 on a GPU that has it)."""
    from pipeline.device import default_dtype
    from pipeline.models.profiles import build_demo, build_tiny, load_vlm
    from pipeline.training.sft import SFTConfig

    torch_dtype = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    if is_shape(model):  # random weights at LLaVA-Med v1.5's shape (benchmarks/shapes.py)
        return build_llava_med_shape(model, device, torch_dtype), model
    sft = project_config(SFTConfig, "sft")
    if model == "models/sft" and not (ROOT / model / "config.json").exists():
        model = "demo"
    if model == "tiny":
        texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
        vlm, label = build_tiny(texts, seed=sft.seed, vision=sft.vision, system_prompt=sft.system_prompt), "tiny"
    elif model == "demo":
        vlm, label = build_demo(sft.seed, sft.vision, sft.system_prompt), "demo"
    else:
        return load_vlm(model, device=device, dtype=torch_dtype), model
    vlm.model.to(device=device, dtype=torch_dtype)
    return vlm, label


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def path_report(count: int, unit: str, seconds: float, flops_per_item: float, peak: dict) -> dict:
    """One path's speed and its counted FLOPs (per item, scaled to `count` items) against the peak."""
    return {"seconds": round(seconds, 4), f"{unit}_per_second": round(count / seconds, 3),
            "flops_per_" + unit.rstrip("s"): int(flops_per_item),
            **utilization(flops_per_item * count, seconds, peak)}


# ----- the two paths ------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(vlm: VLM, rows: list[dict], max_new_tokens: MaxNewTokens) -> list[str]:
    """LLaVA-Med's loop: one question at a time through transformers' `generate`, greedy."""
    answers = []
    for row in rows:
        image = row["image"]
        image = decode_image(image) if isinstance(image, bytes) else image
        prompt = vlm.prompt_ids(row["question"], row["context"], image)
        input_ids = torch.tensor([prompt], device=vlm.device)
        pixel_values = vlm.pixel_values([image]).pixels
        out = vlm.model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens.for_type(row["answer_type"]),
            do_sample=False,
            num_beams=1,
            eos_token_id=vlm.eos_token_id,
            pad_token_id=vlm.pad_token_id,
        )
        answers.append(vlm.decode(out[0, len(prompt):].tolist()))
    return answers


def batched_answers(vlm: VLM, rows: list[dict], batch_size: int, max_new_tokens: MaxNewTokens) -> list[str]:
    return predict(vlm, rows, batch_size, max_new_tokens, desc="batched")


def check_identical(rows: list[dict], ours: list[str], theirs: list[str]) -> None:
    """Raise `PredictionMismatch` naming the first question the two paths answer differently."""
    if len(ours) != len(theirs):
        raise PredictionMismatch(f"batched evaluation gave {len(ours)} answers, generate {len(theirs)}")
    for i, (row, a, b) in enumerate(zip(rows, ours, theirs, strict=True)):
        if a != b:
            n_diff = sum(x != y for x, y in zip(ours, theirs, strict=True))
            raise PredictionMismatch(
                f"predictions differ on question {i} (id {row['id']}, {row['question']!r}): batched "
                f"{a!r}, transformers generate {b!r} ({n_diff} of {len(rows)} questions differ); speed must "
                "not be bought with different outputs"
            )


# ----- the benchmark ----------------------------------------------------------------------------------


def run(model: str = "models/sft", questions: int | None = None, threads: int = 1, device: str = "auto",
        dtype: str = "auto", out: Path | None = None) -> dict:
    """Time both paths on the same rows, check their answers are identical, save and return the report."""
    torch.set_num_threads(threads)
    dev = pick_device(device)
    rows, source = load_rows("test", questions)
    vlm, label = load_model(model, rows, dev, dtype)
    cfg = project_config(EvaluateConfig, "evaluate")
    peak = matmul_peak(dev)

    # warm-up: thread pools, kernels, the chat template
    predict(vlm, rows[:2], 2, cfg.max_new_tokens, desc="warm-up")
    generate_answers(vlm, rows[:1], cfg.max_new_tokens)

    ours, ours_s = timed(lambda: batched_answers(vlm, rows, cfg.batch_size, cfg.max_new_tokens), dev)
    theirs, theirs_s = timed(lambda: generate_answers(vlm, rows, cfg.max_new_tokens), dev)
    check_identical(rows, ours, theirs)

    # FLOPs: ours counted over the whole run (its padding and early stops depend on how the
    # questions fall into batches; one batch scaled up over-counted by 8% on the demo split).
    # generate's per-question work does not depend on the others: counted on a seeded sample.
    _, ours_flops = count_flops(lambda: batched_answers(vlm, rows, cfg.batch_size, cfg.max_new_tokens))
    sample = random.Random(0).sample(rows, min(len(rows), FLOP_SAMPLE))
    _, theirs_flops = count_flops(lambda: generate_answers(vlm, sample, cfg.max_new_tokens))
    n = len(rows)
    batched = path_report(n, "questions", ours_s, ours_flops / n, peak)
    generate = path_report(n, "questions", theirs_s, theirs_flops / len(sample), peak)
    speedup = theirs_s / ours_s
    report = {
        "model": label,
        "rows": source,
        "questions": n,
        **run_header(dev, vlm.dtype),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens.to_dict(),
        "identical_predictions": True,
        "flops_counted_on": {"batched": f"all {n} questions",
                             "generate": f"a seeded random sample of {len(sample)} questions, scaled to {n}"},
        "matmul_peak": peak,
        "batched": {"method": "pipeline.evaluation.predict (left-padded batches, KV cache, positions from the "
                              "attention mask)", "batch_size": cfg.batch_size, **batched},
        "generate": {"method": "LlavaForConditionalGeneration.generate, one question at a time (LLaVA-Med "
                               "model_vqa.py), do_sample=False", "batch_size": 1, **generate},
        **speedup_verdict(speedup, SPEEDUP_TARGET),
    }
    save_run("eval_vs_generate", f"{label}/{dev.type}", report, out)
    return report


@app.command()
def main(
    model: str = typer.Option("models/sft", help="model folder (default models/sft; 'demo' when it has no "
                              "config.json), 'demo' (freshly built) or 'tiny'"),
    questions: int = typer.Option(None, help="the first N test rows (default: all)", min=1),
    threads: int = typer.Option(1, help="torch threads", min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bf16 on GPU) | float32 | bfloat16"),
    out: Path = typer.Option(Path("reports/benchmarks/eval_vs_generate.json"), help="report file (runs merged)"),
) -> None:
    """Batched greedy evaluation against LLaVA-Med's one-question-at-a-time `generate` loop."""
    print(json.dumps(run(model, questions, threads, device, dtype, out), indent=2))


if __name__ == "__main__":
    app()
