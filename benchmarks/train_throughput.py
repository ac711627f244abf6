"""Training throughput (entries/s) of the grouped MLPO step against a pairwise expansion.

Same entries (one image, one question, the chosen answer and J ranked dispreferred answers), same
LoRA adapter, same loss value (MLPO's J explicit + J(J−1)/2 implicit terms), forward + backward +
optimizer step. Three ways to compute it:

- `grouped_shared_prompt` (the `train` stage's default): vision tower once per entry, the prompt
  once per entry with its KV cache shared by the entry's 1 + J answer rows.
- `grouped`: vision tower once per entry, one forward of 1 + J full rows (prompt + answer) per
  entry.
- `pairwise`: what a pairwise DPO trainer (e.g. TRL's) does with the same data: every preference
  pair is a (chosen, rejected) pair of full rows, 2·(J + J(J−1)/2) rows per entry, each row with
  its own copy of the image through the vision tower and vocabulary logits at every position.
  Reference log-probs are precomputed and not timed (TRL would recompute them every step for a
  vision model, so this is the pairwise trainer's best case).

    python benchmarks/train_throughput.py --profile tiny
    python benchmarks/train_throughput.py --profile demo     # models/sft if present, else build_demo()

Adds the run to reports/benchmarks/train_throughput.json under `runs["<profile>/<device>"]` and prints it.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import build_llava_med_shape, is_shape  # noqa: E402
from pipeline.batching import answer_logprobs, collate_sequences  # noqa: E402
from pipeline.data.phantoms import generate_dataset  # noqa: E402
from pipeline.losses import dpo_loss, mlpo_loss  # noqa: E402
from pipeline.models.profiles import build_demo, build_tiny, load_vlm  # noqa: E402
from pipeline.models.vlm import VLM  # noqa: E402
from pipeline.params import project_config  # noqa: E402
from pipeline.reporting import read_json, write_json  # noqa: E402
from pipeline.training.preference import (  # noqa: E402
    EntryCollator,
    GroupedScorer,
    PreferenceConfig,
    apply_lora,
    build_entries,
    lora_parameters,
)
from pipeline.training.sft import SFTConfig  # noqa: E402

app = typer.Typer(add_completion=False)
METHODS = ("grouped_shared_prompt", "grouped", "pairwise")
ANSWERS = ["yes", "no", "left", "right", "1", "2", "3", "small", "large"]


def make_rows(n: int, j: int, seed: int) -> list[dict]:
    """Phantom VQA rows with J dispreferred answers each (other answers of the benchmark)."""
    rows, _ = generate_dataset(n_train=n, n_test=4, seed=seed, prior=0.7, image_size=64)
    for i, row in enumerate(rows):
        others = [a for a in ANSWERS if a != row["answer"]]
        texts = [others[(i + k) % len(others)] for k in range(j)]
        row["rejected"] = [{"text": t, "similarity": 0.9 - 0.1 * k, "level": k + 1, "logprob": 0.0}
                           for k, t in enumerate(texts)]
        row["judgements"] = [{"score": 1.0, "rounds": 1, "agreed": True, "weight": 1.0, "transcript": "[]"}
                             for _ in texts]
    return rows


def load_model(profile: str, rows: list[dict], device: torch.device) -> tuple[VLM, str]:
    if profile == "tiny":
        texts = [r["question"] for r in rows] + ANSWERS
        return build_tiny(texts, seed=0), "tiny (built)"
    if profile == "demo":
        sft = ROOT / "models" / "sft"
        if (sft / "config.json").exists():
            return load_vlm(sft, device=device, dtype=torch.float32), str(sft)
        sft = project_config(SFTConfig, "sft")
        return build_demo(sft.seed, sft.vision, sft.system_prompt), "demo (built, untrained)"
    if is_shape(profile):  # random weights at LLaVA-Med v1.5's shape (benchmarks/shapes.py)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return build_llava_med_shape(profile, device, dtype), profile
    raise typer.BadParameter(f"--profile must be tiny, demo or llava-med-7b[:layers=N], got {profile!r}")


def pairwise_batches(vlm: VLM, rows: list[dict]) -> tuple[list, list, list, list]:
    """(images, questions, answers, contexts) of the chosen and rejected row of every pair, pair order kept."""
    images, questions, contexts, chosen_ans, rejected_ans = [], [], [], [], []
    for row in rows:
        ranked = [row["answer"]] + [r["text"] for r in row["rejected"]]
        for w in range(len(ranked)):
            for lose in range(w + 1, len(ranked)):
                images.append(row["image"])
                questions.append(row["question"])
                contexts.append(row["context"])
                chosen_ans.append(ranked[w])
                rejected_ans.append(ranked[lose])
    # Chosen rows first, then rejected rows, in one forward (TRL's "concatenated forward").
    return images * 2, questions * 2, chosen_ans + rejected_ans, contexts * 2


class Runner:
    def __init__(self, vlm: VLM, rows: list[dict], batch_size: int, device: torch.device):
        self.vlm, self.rows, self.batch_size, self.device = vlm, rows, batch_size, device
        self.cfg = project_config(PreferenceConfig, "train", weighted=False, max_rejected=None)
        self.entries = build_entries(vlm, rows, self.cfg)
        self.j = len(self.entries[0].rejected)
        self.collator = EntryCollator(vlm, self.entries, self.j)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else nullcontext())

    def batches(self, n_steps: int) -> list[list[int]]:
        n = len(self.entries)
        return [[(s * self.batch_size + k) % n for k in range(self.batch_size)] for s in range(n_steps)]

    def grouped_step(self, indices: list[int], share_prompt: bool, reference: torch.Tensor) -> float:
        batch = {k: v.to(self.device) for k, v in self.collator(indices).items()}
        with self.autocast:
            policy = GroupedScorer(self.vlm, share_prompt=share_prompt)(batch)
        ref = reference[batch["entry"]]
        out = mlpo_loss(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], rejected_mask=batch["slots"][:, 1:] >= 0, gamma=0.1, explicit=True, implicit=True)
        out.loss.backward()
        return float(out.loss.detach())

    def pairwise_logps(self, indices: list[int]) -> torch.Tensor:
        images, questions, answers, contexts = pairwise_batches(self.vlm, [self.rows[i] for i in indices])
        batch = collate_sequences(self.vlm, images, questions, answers, contexts=contexts)
        with self.autocast:
            logits = self.vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        return answer_logprobs(logits, batch.labels)

    def pairwise_step(self, indices: list[int], reference: dict[tuple[int, ...], torch.Tensor]) -> float:
        logps = self.pairwise_logps(indices)
        ref = reference[tuple(indices)]
        half = logps.shape[0] // 2
        pairs_per_entry = half // len(indices)
        out = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], gamma=0.1)
        # dpo_loss averages over pairs; MLPO sums the terms of an entry, then averages entries.
        (out.loss * pairs_per_entry).backward()
        return float(out.loss.detach()) * pairs_per_entry

    def reference(self, method: str, schedule: list[list[int]]):
        """Reference log-probs of the batches a method will see (adapter disabled, not timed)."""
        peft_lm = self.vlm.language_model
        with torch.no_grad(), peft_lm.disable_adapter():
            if method == "pairwise":
                return {ix: self.pairwise_logps(list(ix)).float() for ix in {tuple(b) for b in schedule}}
            reference = torch.zeros(len(self.entries), 1 + self.j, device=self.device)
            for ix in {tuple(b) for b in schedule}:
                batch = {k: v.to(self.device) for k, v in self.collator(list(ix)).items()}
                with self.autocast:
                    reference[batch["entry"]] = GroupedScorer(self.vlm, share_prompt=True)(batch).float()
            return reference

    def measure(self, methods: list[str], warmup: int, steps: int) -> dict[str, dict]:
        """Forward + backward + optimizer step of every method, the methods interleaved step by step.

        Interleaving spreads any load from other processes on a shared machine over all methods
        alike, and the median step time ignores the odd slow step. Each method keeps its own copy
        of the adapter and its own optimizer, all starting from the same adapter, so their losses
        after the warm-up steps must agree (a check that they optimize the same objective).
        """
        params = list(lora_parameters(self.vlm).values())
        initial = [p.detach().clone() for p in params]
        schedule = self.batches(warmup + steps)
        references = {m: self.reference(m, schedule) for m in methods}
        state = {m: [p.clone() for p in initial] for m in methods}
        optimizers = {m: torch.optim.AdamW(params, lr=1e-4) for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        losses: dict[str, list[float]] = {m: [] for m in methods}
        self.vlm.model.train()
        for s, indices in enumerate(schedule):
            for m in methods:
                with torch.no_grad():
                    for p, saved in zip(params, state[m], strict=True):
                        p.copy_(saved)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if m == "pairwise":
                    loss = self.pairwise_step(indices, references[m])
                else:
                    loss = self.grouped_step(indices, m == "grouped_shared_prompt", references[m])
                optimizers[m].step()
                optimizers[m].zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if s >= warmup:
                    times[m].append(time.perf_counter() - start)
                losses[m].append(loss)
                with torch.no_grad():
                    for p, saved in zip(params, state[m], strict=True):
                        saved.copy_(p)
        self.vlm.model.eval()
        with torch.no_grad():
            for p, p0 in zip(params, initial, strict=True):
                p.copy_(p0)
        j = self.j
        results = {}
        for m in methods:
            step = statistics.median(times[m])
            rows_per_entry = 1 + j if m != "pairwise" else 2 * (j + j * (j - 1) // 2)
            results[m] = {
                "entries_per_second": self.batch_size / step,
                "median_seconds_per_step": step,
                "step_seconds": [round(t, 4) for t in times[m]],
                "rows_per_entry": rows_per_entry,
                "vision_tower_images_per_entry": 1 if m != "pairwise" else rows_per_entry,
                "lm_tokens_per_entry": round(self.tokens_per_entry(m, schedule[0]), 1),
                "loss_after_warmup": losses[m][warmup] if warmup else None,
            }
        return results

    def tokens_per_entry(self, method: str, indices: list[int]) -> float:
        """Positions the language model runs over, per entry."""
        if method == "pairwise":
            images, questions, answers, contexts = pairwise_batches(self.vlm, [self.rows[i] for i in indices])
            mask = collate_sequences(self.vlm, images, questions, answers, contexts=contexts).attention_mask
            return float(mask.sum()) / len(indices)
        batch = self.collator(indices)
        prompt = batch["prompt_mask"] if method == "grouped_shared_prompt" else batch["prompt_mask"][batch["row_entry"]]
        return float(prompt.sum() + batch["answer_mask"].sum()) / len(indices)


@app.command()
def main(
    profile: str = typer.Option("tiny", help="tiny | demo"),
    entries: int = typer.Option(32, help="distinct entries the steps cycle through"),
    rejected: int = typer.Option(3, help="J dispreferred answers per entry"),
    batch_size: int = typer.Option(0, help="entries per step (0: 8 for tiny, 2 for demo)"),
    steps: int = typer.Option(0, help="timed steps per method (0: 6 for tiny, 3 for demo)"),
    warmup: int = typer.Option(1, help="untimed steps first"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(
        1, help="torch CPU threads; 0 keeps torch's default. 1 by default because on a shared machine "
                "torch's spinning worker threads make CPU timings erratic"),
    methods: str = typer.Option(",".join(METHODS)),
    out: Path = typer.Option(ROOT / "reports" / "benchmarks" / "train_throughput.json"),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    batch_size = batch_size or (8 if profile == "tiny" else 2)
    steps = steps or (6 if profile == "tiny" else 3)
    torch.manual_seed(0)
    rows = make_rows(entries, rejected, seed=0)
    vlm, source = load_model(profile, rows, dev)
    apply_lora(vlm, project_config(PreferenceConfig, "train"))
    vlm.model.to(dev)
    runner = Runner(vlm, rows, batch_size, dev)
    chosen = methods.split(",")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {METHODS}")
    results = runner.measure(chosen, warmup, steps)
    for method, r in results.items():
        typer.echo(f"{method}: {r['entries_per_second']:.2f} entries/s", err=True)
    if "pairwise" in results:
        base = results["pairwise"]["entries_per_second"]
        for r in results.values():
            r["speedup_vs_pairwise"] = round(r["entries_per_second"] / base, 2)
    report = {
        "profile": profile,
        "model": source,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "dtype": "bf16 autocast" if dev.type == "cuda" else "float32",
        "torch_threads": torch.get_num_threads(),
        "entries": entries,
        "rejected_per_entry": rejected,
        "batch_entries": batch_size,
        "timed_steps": steps,
        "results": results,
    }
    # One file for every profile and device measured; a rerun replaces its own entry only.
    runs = read_json(out).get("runs", {}) if out.exists() else {}
    runs[f"{profile}/{dev.type}"] = report
    write_json(out, {"runs": dict(sorted(runs.items()))})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app()
