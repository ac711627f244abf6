"""Decode-mode sampling (`sample.mode: decode`): our two-view KV-cached decoder against the same
two-view contrast run through transformers' `generate`.

What is compared is `pipeline.self_contrast.two_view_decode`: each candidate's answer prefix (up to
and including its first replaced token) is continued greedily under the dropped view (visual
tokens, pixels or patches hidden, `sample.mask_strategy` at `mask_ratio`, each entry's pattern
from its seed), while the full view scores every continuation token. Both views run as one
stacked batch [full rows; dropped rows] with their own KV-cache rows; at every step the dropped
rows' argmax, over every token except the special ones (EOS allowed), is fed to both rows of the
pair; a row stops at EOS (returned, counted in the log-prob). It returns the continuations and
the full view's summed log-probability of them.

The baseline is that contrast through `LlavaForConditionalGeneration.generate`: the same stacked
embeddings and attention mask go in as `inputs_embeds` + `attention_mask` (generate builds the
position ids as `cumsum(mask) - 1`, which at every attended position is our
`position_ids_from_mask`, and extends them by one per step as we do, so the dropped view's
positions match without help), greedy, and the pick is a `LogitsProcessor`.

transformers' built-in classifier-free guidance cannot express the pick, so the processor is a
custom one (`DroppedViewPicks`); see `WHY_CUSTOM_PROCESSOR`, also written into the report.

Inputs are what `sample_batch` gives `two_view_decode` in decode mode: per batch of
`sample.batch_size` entries, every candidate's prefix (the chosen answer with its planned
replacements, cut after the first replaced position), its entry's seed, image and question; one
decode call per batch, as the `sample` stage makes them. The plan (the two-view forward over the
chosen answers) is made once, untimed; both paths are timed from token ids and image bytes to
continuations, prompt building and the vision tower included. Continuations must be identical,
token for token, and the full-view log-probs equal within 1e-4, or the run fails.

FLOPs are counted (torch's FlopCounterMode) on the first decode call of each path and scaled to
the run by generated tokens.

    python benchmarks/sample_vs_generate.py [--model models/sft|demo|tiny] [--entries 32] [--threads 1]

Adds the run to reports/benchmarks/sample_vs_generate.json under `runs["<model>/<device>"]`, prints it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import typer
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_vs_generate import load_model, load_rows, path_report, timed  # noqa: E402
from machine import count_flops, matmul_peak, pick_device, run_header, save_run, speedup_verdict  # noqa: E402

from pipeline.batching import collate_sequences  # noqa: E402
from pipeline.data.images import decode_images  # noqa: E402
from pipeline.mask_strategies import MaskStrategy, two_view_embeddings  # noqa: E402
from pipeline.models.vlm import VLM  # noqa: E402
from pipeline.params import project_config  # noqa: E402
from pipeline.schema import Turn  # noqa: E402
from pipeline.self_contrast import (  # noqa: E402
    SampleConfig,
    _special_ids,
    _surface_form,
    apply_replacements,
    entry_seed,
    plan_entry,
    two_view_answer_logits,
    two_view_decode,
)

app = typer.Typer(add_completion=False)
SPEEDUP_TARGET = 1.5
LOGPROB_TOLERANCE = 1e-4

WHY_CUSTOM_PROCESSOR = (
    "transformers' ClassifierFreeGuidanceLogitsProcessor computes uncond + guidance_scale * (cond - uncond) "
    "over the two halves of the batch, so picking under the dropped (uncond) view needs guidance_scale = 0, "
    "and its constructor raises ValueError unless guidance_scale > 1; it also requires the scores to have "
    "twice the rows of input_ids (MusicGen's decoder doubles the batch inside), which a doubled LLaVA batch "
    "does not (ValueError), and returns one row per pair. generate(guidance_scale=...) uses "
    "UnbatchedClassifierFreeGuidanceLogitsProcessor instead, which does accept 0 (the log-softmax of the "
    "unconditional branch), but runs that branch as a second, separate model(input_ids, attention_mask) call on "
    "negative_prompt_ids: no pixel_values or inputs_embeds and no position ids, so it cannot be the dropped "
    "view (image features with tokens masked out, positions counting attended tokens only). Neither bans "
    "special tokens or records the full view's log-prob. DroppedViewPicks, for each pair of rows, takes the "
    "dropped row's argmax over the allowed tokens, forces it on both rows and records the full row's "
    "log-prob of it."
)


class ContinuationMismatch(AssertionError):
    """The two paths continued a prefix differently."""


# ----- inputs: what sample_batch hands two_view_decode in decode mode ----------------------------------


@torch.no_grad()
def decode_calls(vlm: VLM, rows: list[dict], cfg: SampleConfig) -> list[dict]:
    """One `two_view_decode` call's arguments per batch of `cfg.batch_size` rows, made exactly as
    `sample_batch` makes them in decode mode (the plan of sensitive positions and replacements,
    then every candidate's prefix up to and including its first replaced position)."""
    calls = []
    special = _special_ids(vlm)
    surface = _surface_form(vlm)
    for i in range(0, len(rows), cfg.batch_size):
        batch_rows = rows[i:i + cfg.batch_size]
        seeds = [entry_seed(cfg.seed, r["id"]) for r in batch_rows]
        batch = collate_sequences(vlm, [r["image"] for r in batch_rows], [r["question"] for r in batch_rows],
                                  [r["answer"] for r in batch_rows], contexts=[r["context"] for r in batch_rows])
        logit_full, logit_drop = two_view_answer_logits(vlm, batch, cfg.mask_strategy, cfg.mask_ratio, seeds)
        call: dict[str, list] = {"images": [], "questions": [], "contexts": [], "prefixes": [], "dropped_seeds": []}
        for b, row in enumerate(batch_rows):
            length, start = int(batch.answer_length[b]), int(batch.answer_start[b])
            answer = batch.input_ids[b, start:start + length].tolist()
            plan = plan_entry(answer, logit_full[b, :length], logit_drop[b, :length], cfg, special, seeds[b],
                              surface)
            for replacements in plan.candidates:
                if replacements:
                    first = min(p for p, _ in replacements)
                    call["images"].append(row["image"])
                    call["questions"].append(row["question"])
                    call["contexts"].append(row["context"])
                    call["prefixes"].append(apply_replacements(answer, replacements)[: first + 1])
                    call["dropped_seeds"].append(seeds[b])
        if call["prefixes"]:
            calls.append(call)
    return calls


# ----- the two paths ------------------------------------------------------------------------------------


def ours(vlm: VLM, call: dict, cfg: SampleConfig) -> tuple[list[list[int]], list[float]]:
    return two_view_decode(vlm, call["images"], call["questions"], call["prefixes"], call["dropped_seeds"],
                           cfg.mask_ratio, cfg.max_new_tokens, cfg.mask_strategy, contexts=call["contexts"])


class DroppedViewPicks(LogitsProcessor):
    """For a [full rows; dropped rows] batch: each pair's next token is the dropped row's argmax
    over the allowed tokens (every token but the banned ones), forced on both rows; the full row's
    log-prob of it is recorded per step (`steps`)."""

    def __init__(self, pairs: int, banned: torch.Tensor) -> None:
        self.pairs, self.banned = pairs, banned
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.pairs
        scores = scores.float()
        banned = self.banned[self.banned < scores.shape[-1]].to(scores.device)
        pick = scores[n:].index_fill(-1, banned, float("-inf")).argmax(-1)
        full_logp = torch.log_softmax(scores[:n], -1)
        self.steps.append(full_logp.gather(-1, pick.unsqueeze(-1)).squeeze(-1).double())
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, pick.repeat(2).unsqueeze(-1), 0.0)


@torch.no_grad()
def generate_two_view(vlm: VLM, images: list, questions: list[str], prefixes: list[list[int]],
                      dropped_seeds: list[int], mask_ratio: float, max_new_tokens: int,
                      strategy: MaskStrategy, *, contexts: Sequence[Sequence[Turn]]
                      ) -> tuple[list[list[int]], list[float]]:
    """`two_view_decode`'s contract, through transformers' `generate` with `DroppedViewPicks`."""
    pil = decode_images(images)
    rows = [vlm.prompt_ids(q, c, im) + p for im, q, c, p in zip(pil, questions, contexts, prefixes, strict=True)]
    width, n = max(len(r) for r in rows), len(rows)
    input_ids = torch.full((n, width), vlm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for b, r in enumerate(rows):  # left-padded, as generate expects of a decoder-only model
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    input_ids, mask = input_ids.to(vlm.device), mask.to(vlm.device)
    pixel_values = vlm.pixel_values(pil)
    embeds, masks = two_view_embeddings(vlm, input_ids, mask, pixel_values, strategy, mask_ratio, dropped_seeds)
    banned = _special_ids(vlm)
    picks = DroppedViewPicks(n, banned[banned != vlm.eos_token_id])
    sequences = vlm.model.generate(
        inputs_embeds=embeds,
        attention_mask=masks,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        logits_processor=LogitsProcessorList([picks]),
        eos_token_id=vlm.eos_token_id,
        pad_token_id=vlm.pad_token_id,
    ).tolist()  # only the new tokens: generate was given embeddings, no input ids
    tokens, logprobs = [], []
    for b in range(n):
        row = sequences[b]
        cont = row[: row.index(vlm.eos_token_id) + 1] if vlm.eos_token_id in row else row
        tokens.append(cont)
        logprobs.append(float(sum(float(step[b]) for step in picks.steps[: len(cont)])))
    return tokens, logprobs


def theirs(vlm: VLM, call: dict, cfg: SampleConfig) -> tuple[list[list[int]], list[float]]:
    return generate_two_view(vlm, call["images"], call["questions"], call["prefixes"], call["dropped_seeds"],
                             cfg.mask_ratio, cfg.max_new_tokens, cfg.mask_strategy, contexts=call["contexts"])


def check_identical(calls: list[dict], ours_out: list[tuple], theirs_out: list[tuple]) -> None:
    """Raise `ContinuationMismatch` at the first continuation (or log-prob) the two paths disagree on."""
    for c, (call, (a_tok, a_lp), (b_tok, b_lp)) in enumerate(zip(calls, ours_out, theirs_out, strict=True)):
        for i, (at, bt, al, bl) in enumerate(zip(a_tok, b_tok, a_lp, b_lp, strict=True)):
            where = f"decode call {c}, candidate {i} (question {call['questions'][i]!r}, prefix {call['prefixes'][i]})"
            if at != bt:
                raise ContinuationMismatch(
                    f"continuations differ at {where}: two_view_decode {at}, transformers generate {bt}; "
                    "speed must not be bought with different outputs"
                )
            if abs(al - bl) > LOGPROB_TOLERANCE:
                raise ContinuationMismatch(
                    f"full-view log-probs differ at {where}: two_view_decode {al:.6f}, transformers generate "
                    f"{bl:.6f} (tolerance {LOGPROB_TOLERANCE})"
                )


# ----- the benchmark ----------------------------------------------------------------------------------


def _run_all(vlm: VLM, calls: list[dict], cfg: SampleConfig, path) -> list[tuple]:
    return [path(vlm, call, cfg) for call in calls]


def run(model: str = "models/sft", entries: int = 32, batch_size: int | None = None, threads: int = 1,
        device: str = "auto", dtype: str = "auto", out: Path | None = None) -> dict:
    """Time both decoders on the same decode calls, check they agree, save and return the report."""
    torch.set_num_threads(threads)
    dev = pick_device(device)
    rows, source = load_rows("train", entries)
    vlm, label = load_model(model, rows, dev, dtype)
    overrides = {"mode": "decode"} | ({} if batch_size is None else {"batch_size": batch_size})
    cfg = project_config(SampleConfig, "sample", **overrides)
    peak = matmul_peak(dev)
    calls = decode_calls(vlm, rows, cfg)
    if not calls:
        raise ValueError(f"the {len(rows)} entries give no candidate to decode")

    # warm-up on a slice of the first call
    warm = {k: v[:2] for k, v in calls[0].items()}
    ours(vlm, warm, cfg)
    theirs(vlm, warm, cfg)

    ours_out, ours_s = timed(lambda: _run_all(vlm, calls, cfg, ours), dev)
    theirs_out, theirs_s = timed(lambda: _run_all(vlm, calls, cfg, theirs), dev)
    check_identical(calls, ours_out, theirs_out)

    tokens = sum(len(t) for toks, _ in ours_out for t in toks)
    first_tokens = sum(len(t) for t in ours_out[0][0])
    _, ours_flops = count_flops(lambda: ours(vlm, calls[0], cfg))
    _, theirs_flops = count_flops(lambda: theirs(vlm, calls[0], cfg))
    speedup = theirs_s / ours_s
    report = {
        "model": label,
        "rows": source,
        "entries": len(rows),
        "decode_calls": len(calls),
        "candidates": sum(len(c["prefixes"]) for c in calls),
        "generated_tokens": tokens,
        **run_header(dev, vlm.dtype),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "mask_ratio": cfg.mask_ratio,
        "mask_strategy": cfg.mask_strategy,
        "prefixes": "as sample_batch makes them in decode mode: the chosen answer with a candidate's planned "
                    "replacements, cut after its first replaced position; one decode call per batch of entries",
        "identical_continuations": True,
        "logprob_tolerance": LOGPROB_TOLERANCE,
        "flops_counted_on": f"decode call 0 ({first_tokens} generated tokens), scaled by generated tokens",
        "matmul_peak": peak,
        "two_view_decode": {
            "method": "pipeline.self_contrast.two_view_decode: [full; dropped] rows in one batch, own KV cache, "
                      "dropped view picks, full view scores",
            **path_report(tokens, "tokens", ours_s, ours_flops / first_tokens, peak)},
        "generate": {
            "method": "LlavaForConditionalGeneration.generate(inputs_embeds=[full; dropped], attention_mask, "
                      "do_sample=False, logits_processor=[DroppedViewPicks])",
            "logits_processor": "DroppedViewPicks (custom LogitsProcessor)",
            "why_not_classifier_free_guidance": WHY_CUSTOM_PROCESSOR,
            **path_report(tokens, "tokens", theirs_s, theirs_flops / first_tokens, peak)},
        **speedup_verdict(speedup, SPEEDUP_TARGET),
    }
    save_run("sample_vs_generate", f"{label}/{dev.type}", report, out)
    return report


@app.command()
def main(
    model: str = typer.Option("models/sft", help="model folder (default models/sft; 'demo' when it has no "
                              "config.json), 'demo' (freshly built) or 'tiny'"),
    entries: int = typer.Option(32, help="train rows to sample from", min=1),
    batch_size: int = typer.Option(None, help="entries per decode call (default: sample.batch_size)", min=1),
    threads: int = typer.Option(1, help="torch threads", min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bf16 on GPU) | float32 | bfloat16"),
    out: Path = typer.Option(Path("reports/benchmarks/sample_vs_generate.json"), help="report file (runs merged)"),
) -> None:
    """Two-view decode-mode sampling against the same contrast through transformers' `generate`."""
    print(json.dumps(run(model, entries, batch_size, threads, device, dtype, out), indent=2))


if __name__ == "__main__":
    app()
