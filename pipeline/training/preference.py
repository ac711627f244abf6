"""Preference training on the SFT model: DPO, weighted DPO (MMedPO eq. 3) and MLPO (HSCR eq. 5–7).

LoRA adapters (peft) go on the language model of the SFT checkpoint; the vision tower and the
projector stay frozen. The reference policy π_sft is the same model with its adapter disabled,
so no second copy of the weights is held.

Throughput decisions (docs/design.md § "Losses"):

- An entry is one image, one prompt and 1 + J answers (the chosen answer, then the dispreferred
  ones in rank order). A batch of E entries is scored by one call of `GroupedScorer`: the vision
  tower runs once per entry, not once per sequence, and the 1 + J answers are rows of one batch,
  never 2·(J + J(J−1)/2) pairwise rows.
- `share_prompt` (default): the prompt (visual tokens + question, ~50 tokens) is run once per
  entry, with gradient, and its key/value cache is shared by the entry's 1 + J answers (a few
  tokens each), which run as the rows of a second call on top of it. With answers of a few
  tokens that is ~3.5x fewer tokens than 1 + J full rows. Off, each row carries its own copy of
  the prompt in a single forward; both give the same log-probs (tests/test_preference.py).
- Logits are projected onto the vocabulary only at answer positions.
- Reference log-probs are computed once, before the first step, with the adapter disabled, and
  kept in a table indexed by entry; they are never recomputed during training.
- `dispreferred` (MMedPO §3.1): besides the ranked wrong answers, an entry may train on a visual
  dispreference, its chosen answer under a noised image x*. That answer gets a prompt row and a
  tower pass of its own (`collate_groups(answer_images=...)`); it takes part in the explicit
  terms only, never in MLPO's ranking of dispreferred answers (`implicit_mask`).

The loop runs through `accelerate`: CPU, one GPU, or several GPUs under `accelerate launch`
(DDP; each process computes the full reference table, a forward-only pass over the data).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.device import use_bf16
from pipeline.errors import DataError
from pipeline.grouped_scoring import collate_groups, group_logprobs
from pipeline.losses import LossOutput, dpo_loss, mlpo_loss, with_nll
from pipeline.models.vlm import VLM
from pipeline.resume import BatchStore, run_batches
from pipeline.training.checkpoints import Checkpoints, LoopState, TrainedWeights
from pipeline.training.common import (
    LoraSettings,
    check_whole_parameters,
    configure_deepspeed,
    gradient_checkpointing,
    merge_lora,
    warmup_cosine,
    wrap_lora,
)

LogFn = Callable[[str, dict[str, float]], None]

REFERENCE_SCHEMA = pa.schema([("entry", pa.int64()), ("logps", pa.list_(pa.float32()))])

STEP_METRICS = ("loss", "explicit", "implicit", "nll", "reward_margin", "reward_accuracy", "ranking_accuracy")


class PreferenceConfig(LoraSettings):
    """The `train:` section (docs/training.md explains the values)."""

    loss: Literal["dpo", "mlpo"] = Field(description="dpo: chosen vs the top-ranked dispreferred; mlpo: HSCR eq. 5-7")
    explicit: bool = Field(description="MLPO L_E: chosen vs each dispreferred (mlpo only; HSCR Table 4)")
    implicit: bool = Field(description="MLPO L_I: higher- vs lower-ranked dispreferred (mlpo only; HSCR Table 4)")
    weighted: bool = Field(description="multiply terms by the judges' weights (MMedPO eq. 3); false = plain HSCR")
    gamma: float = Field(gt=0.0, description="the DPO temperature (beta in DPO, gamma in HSCR)")
    nll_weight: float = Field(ge=0.0, description="+ this x the chosen answers' per-token NLL (RPO; TRL rpo_alpha); 0 = HSCR")
    lr: float = Field(gt=0.0, description="peak learning rate of the LoRA adapters")
    epochs: int = Field(ge=1, description="passes over the scored entries")
    batch_size: int = Field(ge=1, description="entries per micro-batch (each entry is 1 + J sequences)")
    grad_accum: int = Field(ge=1, description="micro-batches per optimizer step")
    warmup_fraction: float = Field(ge=0.0, lt=1.0, description="share of optimizer steps in linear warm-up")
    weight_decay: float = Field(ge=0.0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(gt=0.0, description="gradient-norm clip; null = no clipping")
    seed: int = Field(ge=0, description="seeds the adapters' init and the data order")
    max_rejected: int | None = Field(ge=1, description="J cap: the top-ranked J dispreferred of each entry; null keeps all")
    share_prompt: bool = Field(description="run the prompt once per entry, its KV cache shared by the 1+J answers")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        description="auto: bf16 on a GPU that supports it, else fp32"
    )
    evaluate_after: bool = Field(description="one forward-only pass over the data for the final reward metrics")
    checkpoint_every: int | None = Field(
        ge=1, description="save a resumable checkpoint every N optimizer steps (under --work-dir); null = never"
    )
    rationales: bool = Field(
        description="CheXPO: chosen = answer + its rationale, each dispreferred = its text + its counterfactual "
        "rationale (needs score.rationales.enabled); an entry missing one trains on the plain texts"
    )
    dispreferred: Literal["textual", "visual", "both"] = Field(
        description="textual: the ranked wrong answers (HSCR); visual: the chosen answer under the noisy image x* "
        "(MMedPO §3.1, needs sample.visual_dispreference); both: MMedPO's combined setting"
    )
    gradient_checkpointing: bool = Field(
        description="recompute activations in the backward pass (less memory, ~1/3 more compute; 7B on one GPU); "
        "needs share_prompt: false"
    )
    quantize_base: Literal["none", "4bit"] = Field(
        description="4bit: QLoRA, the SFT model's language model loaded in 4-bit NF4 (bitsandbytes) under the adapters; "
        "the merged model is written from the full-precision SFT weights"
    )

    @model_validator(mode="after")
    def _trainable(self) -> PreferenceConfig:
        if self.gradient_checkpointing and self.share_prompt:
            raise ValueError(
                "train: gradient_checkpointing drops the KV cache that share_prompt passes from the prompt's forward "
                "to the answers'; set share_prompt: false with it (the same numbers, more tokens per step)"
            )
        if self.loss == "mlpo" and not (self.explicit or self.implicit):
            raise ValueError(
                "train: loss mlpo with explicit and implicit both false has no term to optimize; "
                "switch at least one on (HSCR Table 4 ablates one at a time)"
            )
        if self.loss == "mlpo" and self.implicit and not self.explicit and self.max_rejected is not None \
                and self.max_rejected < 2:
            raise ValueError("train: implicit-only MLPO ranks dispreferred pairs, so max_rejected must be >= 2")
        if self.loss == "mlpo" and not self.explicit and self.dispreferred != "textual":
            # The visual dispreference has no rank among the wrong answers: only L_E trains on it.
            raise ValueError(
                f"train: dispreferred {self.dispreferred} needs MLPO's explicit term (the visual dispreferred "
                "takes part in L_E only, it is not ranked); set explicit: true or dispreferred: textual"
            )
        return self


# ----- entries ------------------------------------------------------------------------------------


@dataclass
class PreferenceEntry:
    """One scored row, tokenized once: a prompt and its chosen + dispreferred answers."""

    id: str
    image: bytes
    prompt: list[int]
    chosen: list[int]
    rejected: list[list[int]]  # rank order, top-ranked (most similar to the chosen) first; the visual one last
    weights: list[float]  # one per rejected; all 1.0 when training unweighted
    rejected_images: list[bytes | None]  # one per rejected: x* for a visual dispreferred, None = `image`
    ranked: list[bool]  # one per rejected: True = takes part in MLPO's L_I (the textual ones)
    augmented: bool = False  # train.rationales: the texts carry their (counterfactual) rationales

    @property
    def visual(self) -> int:
        """How many of its dispreferred are visual (scored under their own image): 0 or 1."""
        return sum(image is not None for image in self.rejected_images)


def augment(text: str, rationale: dict | None) -> str | None:
    """`text` + " " + the rationale's text; None if there is no rationale (CheXPO, train.rationales)."""
    if not rationale or not (rationale.get("text") or "").strip():
        return None
    return f"{text} {rationale['text'].strip()}"


def entry_texts(row: dict, rejected: list[dict], cfg: PreferenceConfig) -> tuple[str, list[str], bool]:
    """The chosen and dispreferred texts an entry trains on, and whether they carry rationales.

    With `cfg.rationales`, chosen = answer + rationale and each kept dispreferred = its text + its
    counterfactual rationale, all or nothing: the chosen sequence is shared by every pair of the
    entry (and MLPO's implicit terms compare dispreferred with each other), so an entry missing
    any of them trains on the plain texts on every side rather than on a mix of styles.
    """
    plain = (row["answer"], [r["text"] for r in rejected], False)
    if not cfg.rationales:
        return plain
    chosen = augment(row["answer"], row.get("rationale"))
    counterfactuals = list(row.get("counterfactuals") or [])
    texts = [augment(r["text"], counterfactuals[j] if j < len(counterfactuals) else None)
             for j, r in enumerate(rejected)]
    if chosen is None or any(t is None for t in texts):
        return plain
    return chosen, [t for t in texts if t is not None], True


def check_rationales(rows: list[dict], cfg: PreferenceConfig) -> None:
    """With `cfg.rationales`, fail unless some scored row carries a rationale or a counterfactual."""
    if not cfg.rationales or not rows:
        return
    if not any(row.get("rationale") or any(c for c in (row.get("counterfactuals") or [])) for row in rows):
        raise DataError(
            "train: train.rationales is true but the scored input has no rationales at all; set "
            "score.rationales.enabled: true and rerun `score` (if it is on already, every rationale request "
            "failed: see `rationales` in reports/score.json), or set train.rationales: false"
        )


def rejected_per_entry(cfg: PreferenceConfig) -> int | None:
    """How many textual dispreferred answers an entry contributes: DPO uses only the top-ranked one.

    The visual dispreferred (`cfg.dispreferred` visual or both) comes on top of these.
    """
    return 1 if cfg.loss == "dpo" else cfg.max_rejected


def check_visual_dispreference(rows: list[dict], cfg: PreferenceConfig) -> None:
    """With `cfg.dispreferred` visual or both, fail unless some scored row carries a visual dispreferred.

    Cheap (no model), so a stage can call it before loading one; `build_entries` calls it too.
    """
    if cfg.dispreferred == "textual" or not rows:
        return
    if not any(row.get("visual_dispreferred") for row in rows):
        raise DataError(
            f"train: train.dispreferred is {cfg.dispreferred} but no scored entry has a visual dispreferred "
            "(column `visual_dispreferred` is null everywhere); set sample.visual_dispreference.mode "
            "(lesion or global) and rerun `sample` and the stages after it, or set train.dispreferred: textual"
        )


def _judge_weights(row: dict, rejected: list[dict], cfg: PreferenceConfig) -> list[float]:
    """`judgements[j].weight` of each kept textual dispreferred, or all 1.0 when unweighted."""
    if not cfg.weighted:
        return [1.0] * len(rejected)
    rid = row.get("id", "?")
    judgements = list(row.get("judgements") or [])
    if len(judgements) < len(rejected):
        raise DataError(
            f"train: entry {rid} has {len(row['rejected'])} dispreferred answers but "
            f"{len(judgements)} judgements; weighted training needs one weight per answer"
        )
    weights = []
    for j in range(len(rejected)):
        w = judgements[j].get("weight")
        if w is None or not math.isfinite(float(w)):
            raise DataError(
                f"train: entry {rid}, dispreferred {j} has no judge weight ({w!r}); rerun `score`, "
                "or train with weighted: false"
            )
        weights.append(float(w))
    return weights


def _visual_weight(row: dict, visual: dict, cfg: PreferenceConfig) -> float:
    """The visual dispreferred's weight (set by `score`, like the judges'), or 1.0 when unweighted."""
    if not cfg.weighted:
        return 1.0
    w = visual.get("weight")
    if w is None or not math.isfinite(float(w)):
        raise DataError(
            f"train: entry {row.get('id', '?')}: its visual dispreferred has no weight ({w!r}); rerun `score`, "
            "or train with weighted: false"
        )
    return float(w)


def build_entries(vlm: VLM, rows: list[dict], cfg: PreferenceConfig) -> list[PreferenceEntry]:
    """Tokenize scored rows (SCORED_SCHEMA): prompt, `answer` as chosen, and the dispreferred of `cfg.dispreferred`.

    - textual: `rejected[*].text` in rank order (DPO: the top one; MLPO: the top `max_rejected`),
      weighted by `judgements[*].weight`, aligned with `rejected`.
    - visual: only the chosen text again, under `visual_dispreferred.image` (x*), weighted by
      `visual_dispreferred.weight`. Entries without a visual dispreferred are left out (the
      trainer reports how many).
    - both: the textual list, then the visual one last; entries without one train on the textual.

    Weights are read only when `cfg.weighted`; a missing one is an error rather than a silent 1.0.
    With `cfg.rationales` the texts carry the score stage's rationales (`entry_texts`); the visual
    dispreferred's text is the chosen sequence as trained (augmented or not), so the pair differs
    only in the image. Scored rows without any rationale, or (visual, both) without any visual
    dispreferred, are an error.
    """
    check_rationales(rows, cfg)
    check_visual_dispreference(rows, cfg)
    cap = rejected_per_entry(cfg)
    textual = cfg.dispreferred in ("textual", "both")
    entries = []
    for row in rows:
        rid = row.get("id", "?")
        visual = row.get("visual_dispreferred") if cfg.dispreferred != "textual" else None
        if cfg.dispreferred == "visual" and not visual:
            continue  # counted by the trainer as left out
        rejected = list(row.get("rejected") or []) if textual else []
        if textual and not rejected:
            raise DataError(f"train: entry {rid} has no dispreferred answer (rerank should have dropped it)")
        if cap is not None:
            rejected = rejected[:cap]
        weights = _judge_weights(row, rejected, cfg)
        chosen, texts, augmented = entry_texts(row, rejected, cfg)
        chosen_ids = vlm.answer_ids(chosen)
        rejected_ids = [vlm.answer_ids(t) for t in texts]
        images: list[bytes | None] = [None] * len(rejected_ids)
        ranked = [True] * len(rejected_ids)
        if visual:
            if not visual.get("image"):
                raise DataError(f"train: entry {rid}: its visual dispreferred has no image; rerun `sample`")
            rejected_ids.append(list(chosen_ids))
            weights.append(_visual_weight(row, visual, cfg))
            images.append(visual["image"])
            ranked.append(False)
        entries.append(
            PreferenceEntry(
                id=str(rid),
                image=row["image"],
                prompt=vlm.prompt_ids(row["question"], row["context"], row["image"]),
                chosen=chosen_ids,
                rejected=rejected_ids,
                weights=weights,
                rejected_images=images,
                ranked=ranked,
                augmented=augmented,
            )
        )
    if not entries:
        raise DataError("train: the scored input has no preference entries; check the rerank and score reports (reports/rerank.json, reports/score.json)")
    return entries


class EntryCollator:
    """DataLoader collate: entry indices -> one batch of CPU tensors (accelerate moves them).

    The `collate_groups` batch (pipeline/grouped_scoring.py) with the chosen answer in slot 0 and
    the dispreferred ones after it in rank order (a visual one last, on its own image x*), plus:
    - `weights` (E, J), `entry` (E,) the entry's index into the dataset (for the reference table).
    - `implicit_mask` (E, J) bool: the dispreferred that take part in MLPO's L_I (`entry.ranked`).
    - `chosen_length` (E,): answer tokens of each chosen answer (for the per-token NLL term).
    """

    def __init__(self, vlm: VLM, entries: list[PreferenceEntry], n_rejected: int):
        self.vlm = vlm
        self.entries = entries
        self.n_rejected = n_rejected

    def __call__(self, indices: list[int]) -> dict[str, Tensor]:
        chunk = [self.entries[i] for i in indices]
        j = self.n_rejected
        batch = collate_groups(
            self.vlm, [e.image for e in chunk], [e.prompt for e in chunk],
            [[e.chosen] + e.rejected[:j] for e in chunk], width=1 + j,
            answer_images=[[None] + e.rejected_images[:j] for e in chunk],
        )
        weights, implicit_mask = entry_tables(chunk, j)
        batch.update(
            entry=torch.tensor(indices, dtype=torch.long),
            weights=weights,
            implicit_mask=implicit_mask,
            chosen_length=torch.tensor([len(e.chosen) for e in chunk], dtype=torch.float32),
        )
        return batch


def entry_tables(entries: list[PreferenceEntry], n_rejected: int) -> tuple[Tensor, Tensor]:
    """(E, J) `weights` (1.0 in empty slots) and `implicit_mask` (False in empty slots) of `entries`."""
    weights = torch.ones((len(entries), n_rejected), dtype=torch.float32)
    implicit_mask = torch.zeros((len(entries), n_rejected), dtype=torch.bool)
    for b, e in enumerate(entries):
        k = min(len(e.rejected), n_rejected)
        weights[b, :k] = torch.tensor(e.weights[:k], dtype=torch.float32)
        implicit_mask[b, :k] = torch.tensor(e.ranked[:k], dtype=torch.bool)
    return weights, implicit_mask


# ----- scoring ------------------------------------------------------------------------------------


class GroupedScorer(nn.Module):
    """Summed answer log-probs of every sequence of a batch of entries, as an (E, 1 + J) table
    (`group_logprobs`: the tower and the prompt run once per entry, and once more for a visual
    dispreferred, which is scored on its own image x*).

    An nn.Module so that accelerate can wrap it (DDP, autocast); the parameters are the VLM's.
    """

    def __init__(self, vlm: VLM, share_prompt: bool):
        super().__init__()
        self.model = vlm.model
        self.vlm = vlm
        self.share_prompt = share_prompt

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return group_logprobs(self.vlm, batch, share_prompt=self.share_prompt)


def preference_loss(
    cfg: PreferenceConfig,
    policy: Tensor,
    reference: Tensor,
    slots: Tensor,
    weights: Tensor,
    chosen_length: Tensor | None = None,
    implicit_mask: Tensor | None = None,
) -> LossOutput:
    """The configured loss on (E, 1 + J) log-prob tables (chosen in column 0, dispreferred in rank order).

    `implicit_mask` (E, J) leaves dispreferred out of MLPO's L_I (the visual one; None: none left
    out). DPO with a visual dispreferred (`cfg.dispreferred` visual or both) is MMedPO's
    D_t ∪ D_v: one weighted DPO pair per present dispreferred (the top textual one and the
    visual one), i.e. MLPO's explicit term alone; textual DPO is the plain pair as before.
    With `cfg.nll_weight` > 0, `chosen_length` (E,) is required and the per-token NLL of the
    chosen answers is added (`with_nll`).
    """
    if cfg.loss == "dpo" and cfg.dispreferred == "textual":
        out = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], gamma=cfg.gamma,
                       weights=weights[:, 0] if cfg.weighted else None)
    else:
        dpo = cfg.loss == "dpo"
        out = mlpo_loss(
            policy[:, 0], policy[:, 1:], reference[:, 0], reference[:, 1:], gamma=cfg.gamma,
            explicit=True if dpo else cfg.explicit, implicit=False if dpo else cfg.implicit,
            weights=weights if cfg.weighted else None,
            rejected_mask=slots[:, 1:] >= 0,
            implicit_mask=implicit_mask,
        )
    if cfg.nll_weight > 0:
        if chosen_length is None:
            raise ValueError("preference_loss: nll_weight > 0 needs the chosen answers' token counts")
        out = with_nll(out, policy[:, 0], chosen_length, cfg.nll_weight)
    return out


# ----- LoRA ---------------------------------------------------------------------------------------


def apply_lora(vlm: VLM, cfg: PreferenceConfig):
    """LoRA on the language model; everything else frozen. Returns the peft model (its adapter is the policy)."""
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    return wrap_lora(vlm, cfg)


def lora_parameters(vlm: VLM) -> dict[str, Tensor]:
    """The trainable adapter parameters by name."""
    return {n: p for n, p in vlm.model.named_parameters() if p.requires_grad}


# ----- training -----------------------------------------------------------------------------------


class PreferenceTrainer:
    """Holds the policy (SFT + LoRA), the tokenized entries and the kept reference table.

    Use: `trainer = PreferenceTrainer(vlm, rows, cfg)`, `trainer.train()`, `trainer.save(folder)`.
    `train` computes the reference table first if `compute_reference` was not called.

    With `work_dir` and `key` (a content fingerprint of the inputs, the config and the code:
    `resume_key`), the reference table is cached under `work_dir/key/` and computed in resumable
    batches, and checkpoints are saved every `cfg.checkpoint_every` steps
    (pipeline/training/checkpoints.py): a restarted trainer continues where the last one stopped.
    """

    def __init__(self, vlm: VLM, rows: list[dict], cfg: PreferenceConfig, log: LogFn | None = None,
                 work_dir: str | Path | None = None, key: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.log = log
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if use_bf16() else "no"
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed)
        check_whole_parameters(self.accelerator)
        set_seed(cfg.seed)
        self.vlm = vlm
        self.entries = build_entries(vlm, rows, cfg)
        # `visual` mode leaves out the entries without a visual dispreferred (reported)
        self.left_out = len(rows) - len(self.entries)
        # build_entries kept at most the textual cap, plus the visual one: J = the most any entry has
        self.n_rejected = max(len(e.rejected) for e in self.entries)
        if cfg.loss == "mlpo" and cfg.implicit and not cfg.explicit and self.n_rejected < 2:
            raise DataError("train: implicit-only MLPO needs entries with at least two dispreferred answers")
        self.peft_lm = apply_lora(vlm, cfg)
        vlm.model.to(self.accelerator.device)
        self.scorer = GroupedScorer(vlm, share_prompt=cfg.share_prompt)
        self.collator = EntryCollator(vlm, self.entries, self.n_rejected)
        self.reference: Tensor | None = None
        self.history: list[dict[str, float]] = []
        self.timings: dict[str, float] = {}
        # What this run reused from an interrupted one (the run report, not the cached metrics).
        self.reuse: dict[str, Any] = {"reference_batches_reused": 0, "resumed_from_step": 0}
        if (work_dir is None) != (key is None):
            raise ValueError("PreferenceTrainer: give both work_dir and key, or neither")
        self.loop = LoopState()
        self.checkpoints = Checkpoints(
            self.accelerator, work_dir, key or "", cfg.checkpoint_every,
            TrainedWeights(lora_parameters(vlm).items()), self.loop, "train",
        )

    # -- scoring over the whole data set, in order, without gradient
    def _ordered_loader(self) -> DataLoader:
        return DataLoader(list(range(len(self.entries))), batch_size=self.cfg.batch_size, shuffle=False,
                          collate_fn=self.collator)

    @torch.no_grad()
    def score(self, adapter: bool = True, desc: str | None = None) -> Tensor:
        """(N, 1 + J) log-prob table of every entry, under the policy or (adapter=False) the reference."""
        device = self.accelerator.device
        table = torch.zeros(len(self.entries), 1 + self.n_rejected, device=device)
        was_training = self.vlm.model.training
        self.vlm.model.eval()
        context = nullcontext() if adapter else self.peft_lm.disable_adapter()
        loader = self._ordered_loader()
        bar = tqdm(loader, desc=desc, unit="batch", disable=desc is None or not self.accelerator.is_main_process)
        with context, self.accelerator.autocast():
            for batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                table[batch["entry"]] = self.scorer(batch).float()
        self.vlm.model.train(was_training)
        return table

    def compute_reference(self) -> Tensor:
        """Score every entry under π_sft (adapter disabled) once; training reads this table.

        With a work folder the table is computed in resumable batches by the main process and
        kept as `reference.safetensors` until the run's output is saved (a restart reads it).
        """
        start = time.perf_counter()
        folder = self.checkpoints.folder
        if folder is None:
            self.reference = self.score(adapter=False, desc="train: reference log-probs")
        else:
            file = folder / "reference.safetensors"
            if self.accelerator.is_main_process and not file.is_file():
                self._reference_in_batches(file)
            self.accelerator.wait_for_everyone()
            self.reference = load_file(str(file))["logps"].to(self.accelerator.device)
        self.timings["reference_seconds"] = time.perf_counter() - start
        return self.reference

    def _reference_in_batches(self, file: Path) -> None:
        store = BatchStore(file.parent / "reference-parts", "parts", REFERENCE_SCHEMA)
        device = self.accelerator.device
        self.vlm.model.eval()

        @torch.no_grad()
        def compute(indices: list[int]) -> list[dict]:
            batch = {k: v.to(device) for k, v in self.collator(indices).items()}
            with self.peft_lm.disable_adapter(), self.accelerator.autocast():
                table = self.scorer(batch).float().cpu()
            return [{"entry": i, "logps": row} for i, row in zip(indices, table.tolist(), strict=True)]

        done = run_batches(list(range(len(self.entries))), self.cfg.batch_size, compute, store,
                           "train: reference log-probs", clear=False)
        self.reuse["reference_batches_reused"] = done.reused
        logps = torch.tensor(done.table.column("logps").to_pylist(), dtype=torch.float32)
        tmp = file.with_name(file.name + ".tmp")
        save_file({"logps": logps}, str(tmp))
        tmp.replace(file)
        store.clear()  # only once the whole table is on disk

    def _all_slots_and_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """`slots` (N, 1 + J), `weights` and `implicit_mask` (N, J) of every entry, as the collator makes them."""
        device = self.accelerator.device
        slots = torch.full((len(self.entries), 1 + self.n_rejected), -1, dtype=torch.long, device=device)
        for i, e in enumerate(self.entries):
            k = min(len(e.rejected), self.n_rejected)
            slots[i, : 1 + k] = torch.arange(1 + k)  # any non-negative value marks a present slot
        weights, implicit_mask = entry_tables(self.entries, self.n_rejected)
        return slots, weights.to(device), implicit_mask.to(device)

    def evaluate(self) -> dict[str, Any]:
        """The loss and reward metrics of the current policy over all entries (no gradient)."""
        if self.reference is None:
            self.compute_reference()
        policy = self.score(adapter=True)
        slots, weights, implicit_mask = self._all_slots_and_weights()
        lengths = torch.tensor([len(e.chosen) for e in self.entries], dtype=torch.float32, device=policy.device)
        with torch.no_grad():
            return preference_loss(self.cfg, policy, self.reference, slots, weights, lengths,
                                   implicit_mask).to_dict()

    def train(self) -> dict[str, Any]:
        """Run the configured epochs; returns a summary for the stage report."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.reference is None:
            self.compute_reference()
        reference = self.reference
        params = list(lora_parameters(self.vlm).values())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The shuffling generator's state at the start of each epoch is checkpointed: a resumed
        # run restores it, so the interrupted epoch's order (and every later one) is the same.
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(list(range(len(self.entries))), batch_size=cfg.batch_size, shuffle=True,
                            collate_fn=self.collator, generator=generator)
        loader = accelerator.prepare(loader)  # sharded across processes: len() is per process
        steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
        # A prepared scheduler advances once per process at every optimizer step.
        total_steps = steps_per_epoch * cfg.epochs * accelerator.num_processes
        warmup = int(cfg.warmup_fraction * total_steps)
        scheduler = warmup_cosine(optimizer, warmup, total_steps)
        configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
        model, optimizer, scheduler = accelerator.prepare(self.scorer, optimizer, scheduler)

        start_epoch, skip = 0, 0
        if self.checkpoints.restore():
            position = self.loop.values
            start_epoch, skip = position["epoch"], position["batches_done"]
            generator.set_state(position["generator_state"])
            self.history = list(position["history"])
            self.reuse["resumed_from_step"] = len(self.history)
            if self.log and accelerator.is_main_process:
                for values in self.history:  # the curves of the finished steps, as first logged
                    self.log("train", values)

        self.vlm.model.train()
        self.vlm.vision_tower.eval()
        gradient_checkpointing(self.vlm, cfg.gradient_checkpointing)
        pending: list[Tensor] = []
        entries_seen = 0
        total = steps_per_epoch * cfg.epochs
        bar = tqdm(total=total, initial=len(self.history), desc=f"train: {cfg.loss}",
                   unit="step", disable=not accelerator.is_main_process)
        start = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            resumed_epoch = epoch == start_epoch and skip > 0
            if not resumed_epoch:
                self.loop.values["generator_state"] = generator.get_state()
            batches_done = skip if resumed_epoch else 0
            for batch in accelerator.skip_first_batches(loader, skip) if resumed_epoch else loader:
                with accelerator.accumulate(model):
                    policy = model(batch)
                    out = preference_loss(cfg, policy, reference[batch["entry"]], batch["slots"], batch["weights"],
                                          batch["chosen_length"], batch["implicit_mask"])
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                entries_seen += int(batch["entry"].numel())
                batches_done += 1
                pending.append(_metric_vector(out))
                if accelerator.sync_gradients:
                    values = self._step_values(pending, lr, epoch)
                    pending = []
                    self.history.append(values)
                    if self.log and accelerator.is_main_process:
                        self.log("train", values)
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", margin=f"{values['reward_margin']:.3f}")
                    step = len(self.history)
                    if self.checkpoints.due(step) and step < total:
                        self._checkpoint(step, epoch, batches_done, len(loader), generator)
        bar.close()
        gradient_checkpointing(self.vlm, False)
        train_seconds = time.perf_counter() - start
        self.timings["train_seconds"] = train_seconds
        self.vlm.model.eval()

        summary: dict[str, Any] = {
            "loss": cfg.loss,
            "weighted": cfg.weighted,
            "explicit": cfg.explicit if cfg.loss == "mlpo" else True,
            "implicit": cfg.implicit if cfg.loss == "mlpo" else False,
            "entries": len(self.entries),
            # train.rationales: entries trained on rationale-augmented texts, and those that fell back
            # to the plain texts (a rationale or counterfactual missing); 0 and all when off
            "rationale_entries": sum(e.augmented for e in self.entries),
            "plain_entries": sum(not e.augmented for e in self.entries),
            "rejected_per_entry": self.n_rejected,
            # train.dispreferred (MMedPO §3.1): entries that trained on a visual pair (chosen answer
            # under x*), and those left out for having none (`visual` mode only; 0 otherwise)
            "dispreferred": cfg.dispreferred,
            "visual_pairs": sum(e.visual for e in self.entries),
            "entries_left_out": self.left_out,
            "epochs": cfg.epochs,
            "optimizer_steps": len(self.history),
            "trainable_parameters": sum(p.numel() for p in params),
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "first_step_loss": self.history[0]["loss"] if self.history else None,
            "final_step_loss": self.history[-1]["loss"] if self.history else None,
        }
        self.timings["train_entries_per_second"] = entries_seen * accelerator.num_processes / train_seconds
        if cfg.evaluate_after:
            final = self.evaluate()
            summary.update({f"final_train_{k}": v for k, v in final.items()})
        return summary

    def _checkpoint(self, step: int, epoch: int, batches_done: int, batches_per_epoch: int,
                    generator: torch.Generator) -> None:
        if batches_done >= batches_per_epoch:  # the epoch is over: resume at the next one
            epoch, batches_done = epoch + 1, 0
            self.loop.values["generator_state"] = generator.get_state()
        self.loop.values.update(epoch=epoch, batches_done=batches_done, history=list(self.history),
                                where=f"step {step}, epoch {epoch}, {batches_done} batches into it")
        self.checkpoints.save(step)

    def _step_values(self, pending: list[Tensor], lr: float, epoch: int) -> dict[str, float]:
        """Mean over the micro-batches of one optimizer step, and over processes."""
        stacked = torch.stack(pending).nanmean(0)
        stacked = self.accelerator.reduce(stacked, reduction="mean")
        values = {name: float(v) for name, v in zip(STEP_METRICS, stacked.tolist(), strict=True)}
        if math.isnan(values["ranking_accuracy"]):
            del values["ranking_accuracy"]  # DPO, or J < 2: nothing to rank
        if math.isnan(values["nll"]):
            del values["nll"]  # nll_weight 0: the term is off
        values["lr"] = lr
        values["epoch"] = epoch
        return values

    def save(self, folder: str | Path | None, full_precision: Callable[[], VLM] | None = None) -> None:
        """Adapter into `folder/adapter`, then the merged model as a full VLM folder into `folder`.

        Every process calls it (it holds barriers); only the main process writes, and the others
        may pass None. Merging folds the adapter into the weights, so the trainer is finished
        afterwards. With a 4-bit base (`quantize_base: 4bit`), `full_precision` loads the same
        model in full precision: the adapter is put on it and merged there, since folding it into
        4-bit weights would round it away.
        """
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            folder = Path(folder)
            self.peft_lm.save_pretrained(folder / "adapter")
            _sort_target_modules(folder / "adapter" / "adapter_config.json")
            if self.cfg.quantize_base == "none":
                merge_lora(self.vlm, self.peft_lm)
                self.vlm.model.eval()
                self.vlm.save(folder)
            else:
                if full_precision is None:
                    raise ValueError("save: a 4-bit base needs `full_precision`, the SFT model in full precision")
                from peft import get_peft_model_state_dict, set_peft_model_state_dict

                full = full_precision()
                full_lm = apply_lora(full, self.cfg)
                set_peft_model_state_dict(full_lm, get_peft_model_state_dict(self.peft_lm))
                merge_lora(full, full_lm)
                full.model.eval()
                full.save(folder)
        self.accelerator.wait_for_everyone()


def _sort_target_modules(config_file: Path) -> None:
    # peft keeps target_modules as a set and writes it in hash order, which changes from process to
    # process: the same adapter would get a different DVC hash on every run.
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def _metric_vector(out: LossOutput) -> Tensor:
    nan = torch.tensor(float("nan"), device=out.loss.device)
    values = [getattr(out, name) for name in STEP_METRICS]
    return torch.stack([nan if v is None else v.detach().float() for v in values])


def resume_key(cfg: PreferenceConfig, input_digest: str, model_digest: str, processes: int) -> str:
    """The content key of a training run's checkpoints: everything that determines its steps."""
    from pipeline.fingerprint import code_version, fingerprint

    code = code_version(["pipeline.training", "pipeline.grouped_scoring", "pipeline.losses", "pipeline.batching",
                         "pipeline.models"])
    steps = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}  # how often is not what
    return fingerprint("train", input_digest, model_digest, steps, code, processes)


def train_preference(vlm: VLM, rows: list[dict], cfg: PreferenceConfig, out: str | Path | None = None,
                     log: LogFn | None = None) -> dict[str, Any]:
    """LoRA preference training of `vlm` on scored rows; saves to `out` when given. Returns the summary."""
    trainer = PreferenceTrainer(vlm, rows, cfg, log=log)
    summary = trainer.train()
    summary["config"] = cfg.to_dict()
    if out is not None:
        trainer.save(out)
    return summary
