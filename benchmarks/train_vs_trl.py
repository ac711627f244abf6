"""Training throughput of our grouped MLPO / DPO step against TRL's `DPOTrainer`, same model, same data.

One run, one machine: N entries (one image, one question, the chosen answer and J ranked
dispreferred answers, `train_throughput.make_rows`), one whole epoch per method, each method in
its own process (`machine.run_isolated`) so its peak memory is its own:

- `ours_mlpo`: the `train` stage's step: `GroupedScorer(share_prompt=True)` (vision tower once per
  entry, the prompt once per entry with its KV cache shared by the 1 + J answers), MLPO's full
  objective (J explicit + J(J-1)/2 implicit terms: 6 preference pairs per entry at J=3),
  forward + backward + AdamW step. The reference log-probs are computed once for the whole data
  set with the adapter disabled (as `PreferenceTrainer.compute_reference`), timed, and amortized
  over `--epochs` (params.yaml `train.epochs`): each epoch pays 1/epochs of it.
- `ours_dpo`: the same scorer and reference table, `dpo_loss` over the J pairs (chosen,
  dispreferred_k) of each entry, averaged over pairs as TRL averages its batch (our MLPO's
  explicit term alone, divided by J).
- `trl_dpo`: TRL's `DPOTrainer` on the same J pairs per entry expanded pairwise (J·N dataset rows),
  LoRA equal to ours given as `peft_config`, `ref_model=None`: the reference is the policy with
  its adapter disabled, recomputed by a second forward at every step (TRL refuses
  `precompute_ref_log_probs` for vision datasets).
- `trl_dpo_mlpo_pairs`: TRL on all J + J(J-1)/2 ranked pairs per entry, what TRL needs to cover
  MLPO's full objective.

Steps are matched in pairs: ours takes `--batch-entries` E entries a step, TRL
`per_device_train_batch_size` = E x pairs-per-entry rows, so both take ceil(N / E) optimizer steps
over the same pairs per epoch. TRL's prompt and answer tokens are checked to equal ours
(`VLM.prompt_ids`, `VLM.answer_ids`) before it trains.

Memory: TRL's rows keep their activations for the backward (no gradient checkpointing on either
side); on the demo model with 8 entries a step, `trl_dpo_mlpo_pairs` runs 96 full rows a step and
its peak RSS is several GiB (about 7 GiB at 4 entries a step), so run it on a machine with room.

    python benchmarks/train_vs_trl.py --profile tiny --entries 8
    python benchmarks/train_vs_trl.py --profile demo      # models/sft if present, else build_demo()

Adds the run to reports/benchmarks/train_vs_trl.json under `runs["<profile>/<device>"]` and prints it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import (  # noqa: E402
    count_flops,
    device_name,
    matmul_peak,
    pick_device,
    proc_status_mib,
    run_isolated,
    save_run,
    synchronize,
    utilization,
)
from benchmarks.shapes import is_shape  # noqa: E402
from benchmarks.train_throughput import load_model, make_rows  # noqa: E402
from pipeline.losses import dpo_loss, mlpo_loss  # noqa: E402
from pipeline.models.vlm import IMAGE_TOKEN, VLM  # noqa: E402
from pipeline.params import project_config  # noqa: E402
from pipeline.schema import Turn  # noqa: E402
from pipeline.training.common import warmup_cosine  # noqa: E402
from pipeline.training.preference import (  # noqa: E402
    EntryCollator,
    GroupedScorer,
    PreferenceConfig,
    apply_lora,
    build_entries,
    lora_parameters,
)

app = typer.Typer(add_completion=False)
# trl_dpo_checkpointed: trl_dpo with TRL's default gradient checkpointing on (its memory as its
# users get it); not in the default set, `--methods ours_dpo,trl_dpo_checkpointed` runs it.
METHODS = ("ours_mlpo", "ours_dpo", "trl_dpo", "trl_dpo_mlpo_pairs", "trl_dpo_checkpointed")
DEFAULT_METHODS = METHODS[:4]
TARGET_SPEEDUP = 10.0
TARGET_MEMORY_RATIO = 0.6

# What TRL 1.16's DPOTrainer cannot do that the `train` stage does, each checked against
# trl/trainer/dpo_trainer.py and dpo_config.py of the installed version.
TRL_CANNOT = [
    "Several dispreferred answers per prompt in one group: an example is one (prompt, chosen, rejected) "
    "triple (DataCollatorForVisionPreference; _compute_loss splits the batch into a chosen and a rejected "
    "half), so J dispreferred answers must be expanded into pairwise rows: J pairs per entry for DPO (3 at "
    "J=3) and J + J(J-1)/2 for MLPO's ranked objective (6 at J=3). Every row carries the full prompt and its "
    "own copy of the image (the collator repeats `images` for the chosen and the rejected half), so the "
    "vision tower and the prompt run 2 x pairs times per entry for the policy and again for the reference, "
    "where ours runs them once per entry.",
    "Per-response weights (MMedPO's weighted DPO, eq. 3): there is no weight column; the vision collator "
    "reads only images/prompt/chosen/rejected, and with the default remove_unused_columns=True any other "
    "column is dropped before it. DPOConfig.use_weighting is something else: WPO's weights, computed from "
    "the policy's own length-normalized sequence probabilities (exp of the mean aligned per-token log-prob, "
    "chosen weight x rejected weight, under no_grad), not given by the data.",
    "A dispreferred response with its own image (MMedPO's visual dispreference, the chosen answer under a "
    "noised image x*): the collator gives the chosen and the rejected row of an example the same `images`, "
    "so a rejected response cannot be scored under another image without a custom collator and loss.",
    "The reference pass once per run: precompute_ref_log_probs=True raises ValueError for vision datasets "
    "('`precompute_ref_log_probs=True` is not supported for vision datasets'), so with a PEFT adapter and "
    "ref_model=None the reference log-probs come from a second forward with the adapter disabled at every "
    "step of every epoch; ours computes the (N, 1+J) table once and reads it.",
    "Sharing one prompt pass across an entry's answers: each pairwise row runs prompt + answer in full; "
    "ours runs the prompt once per entry and its KV cache serves the 1 + J answer rows.",
]


# Std of the drawn LoRA B: large enough that the first-step loss moves off log 2.
B_INIT_STD = 0.02


def pairs_per_entry(method: str, j: int) -> int:
    """Preference pairs a method trains on per entry: J for DPO, J + J(J-1)/2 for MLPO's ranking."""
    return j if method in ("ours_dpo", "trl_dpo", "trl_dpo_checkpointed") else j + j * (j - 1) // 2


def seed_adapter(model: torch.nn.Module, seed: int) -> int:
    """Give every LoRA A and B matrix the same values whatever wraps it (ours: the language model;
    TRL: the whole VLM), keyed by the path from `layers.` on.

    B is drawn too (peft starts it at zero): with B = 0 the policy equals the reference at step 0
    and every DPO loss is log 2 whatever each side computes, so the first-step loss check would
    prove nothing. With both drawn, the two sides' first-step losses agree only if they score the
    same tokens the same way. Returns how many matrices were set.
    """
    named = {}
    for name, p in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and "layers." in name:
            named[name[name.index("layers."):]] = p
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(named):
            p = named[key]
            w = torch.empty(p.shape, dtype=torch.float32)
            if ".lora_A." in key:
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            else:
                w.normal_(0.0, B_INIT_STD, generator=generator)
            p.copy_(w.to(p.device, p.dtype))
    return len(named)


def preference_config() -> PreferenceConfig:
    # Every dispreferred of make_rows kept (loss mlpo: build_entries keeps one for dpo), unweighted.
    return project_config(PreferenceConfig, "train", weighted=False, max_rejected=None, loss="mlpo")


def batch_schedule(n: int, e: int) -> list[list[int]]:
    return [list(range(i, min(i + e, n))) for i in range(0, n, e)]


def _setup(settings: dict) -> tuple[VLM, list[dict], str, torch.device, float]:
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = pick_device(settings["device"])
    torch.manual_seed(0)
    rows = make_rows(settings["entries"], settings["rejected"], seed=0)
    vlm, source = load_model(settings["profile"], rows, device)
    vlm.model.to(device)
    return vlm, rows, source, device, proc_status_mib("VmRSS")


def _memory(device: torch.device, rss_after_load: float, rss_before_training: float,
            cuda_before_training: float | None) -> dict:
    out = {"rss_after_model_load_mib": round(rss_after_load, 1),
           "rss_before_training_mib": round(rss_before_training, 1)}
    if cuda_before_training is not None:
        out["cuda_memory_allocated_before_training_mib"] = cuda_before_training
    if device.type == "cuda":
        out["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ----- ours ---------------------------------------------------------------------------------------


class GroupedStep:
    """The `train` stage's preference step as the `ours_*` methods run it, shared with
    benchmarks/memory_7b.py: entries tokenized (`build_entries`), LoRA applied (`apply_lora`),
    `GroupedScorer(share_prompt=True)`, AdamW with the warm-up cosine schedule, the reference table
    computed once with the adapter disabled (as `PreferenceTrainer.compute_reference`), then
    forward + backward + clipped optimizer step per batch of entries.

    `adapter_seed` draws LoRA A and B (`seed_adapter`, for the loss check against TRL); None keeps
    peft's own init (B = 0), as the `train` stage starts.
    """

    def __init__(self, vlm: VLM, rows: list[dict], cfg: PreferenceConfig, batch_entries: int,
                 device: torch.device, autocast: Any, adapter_seed: int | None):
        self.vlm, self.cfg, self.device, self.autocast = vlm, cfg, device, autocast
        start = time.perf_counter()
        self.entries = build_entries(vlm, rows, cfg)
        self.tokenize_seconds = time.perf_counter() - start
        self.j = max(len(e.rejected) for e in self.entries)
        self.peft_lm = apply_lora(vlm, cfg)
        if adapter_seed is not None:
            seed_adapter(vlm.model, adapter_seed)
        vlm.model.to(device)
        self.scorer = GroupedScorer(vlm, share_prompt=True)
        self.collator = EntryCollator(vlm, self.entries, self.j)
        self.schedule = batch_schedule(len(self.entries), batch_entries)
        self.params = list(lora_parameters(vlm).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, int(cfg.warmup_fraction * len(self.schedule)),
                                       len(self.schedule))
        self.reference: torch.Tensor | None = None

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.collator(indices).items()}

    @torch.no_grad()
    def reference_pass(self) -> torch.Tensor:
        """The (N, 1 + J) reference table, once per run (PreferenceTrainer.score(adapter=False))."""
        table = torch.zeros(len(self.entries), 1 + self.j, device=self.device)
        self.vlm.model.eval()
        with self.peft_lm.disable_adapter(), self.autocast:
            for indices in self.schedule:
                batch = self.batch(indices)
                table[batch["entry"]] = self.scorer(batch).float()
        self.reference = table
        return table

    def train_mode(self) -> None:
        self.vlm.model.train()
        self.vlm.vision_tower.eval()

    def loss_of(self, method: str, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        with self.autocast:
            policy = self.scorer(batch)
        ref = self.reference[batch["entry"]]
        if method == "ours_mlpo":
            return mlpo_loss(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], gamma=cfg.gamma,
                             explicit=True, implicit=True, rejected_mask=batch["slots"][:, 1:] >= 0)
        # DPO over the J (chosen, dispreferred_k) pairs of each entry, the mean over pairs.
        k = policy.shape[1] - 1
        return dpo_loss(policy[:, :1].expand(-1, k).reshape(-1), policy[:, 1:].reshape(-1),
                        ref[:, :1].expand(-1, k).reshape(-1), ref[:, 1:].reshape(-1), gamma=cfg.gamma)

    def step(self, method: str, batch: dict[str, torch.Tensor]):
        """One optimizer step on `batch`; returns the loss output (its `.loss` detached by the caller)."""
        out = self.loss_of(method, batch)
        out.loss.backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out


def run_ours(method: str, settings: dict) -> dict:
    vlm, rows, source, device, rss_after_load = _setup(settings)
    cfg = preference_config()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    grouped = GroupedStep(vlm, rows, cfg, settings["batch_entries"], device, autocast, settings["adapter_seed"])
    entries, j, schedule, scorer = grouped.entries, grouped.j, grouped.schedule, grouped.scorer
    tokenize_seconds = grouped.tokenize_seconds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before_training = proc_status_mib("VmRSS")
    cuda_before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None

    synchronize(device)
    start = time.perf_counter()
    grouped.reference_pass()
    synchronize(device)
    reference_seconds = time.perf_counter() - start

    # FLOPs of one step (forward + backward) and the first-step loss, on the first batch, untimed.
    grouped.train_mode()
    first = grouped.batch(schedule[0])

    def forward_backward() -> float:
        out = grouped.loss_of(method, first)
        out.loss.backward()
        return float(out.loss.detach())

    first_loss, step_flops = count_flops(forward_backward)
    grouped.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), grouped.peft_lm.disable_adapter(), autocast:
        _, reference_flops_first_batch = count_flops(lambda: scorer(first))

    synchronize(device)
    start = time.perf_counter()
    for indices in schedule:
        out = grouped.step(method, grouped.batch(indices))
    synchronize(device)
    loop_seconds = time.perf_counter() - start
    vlm.model.eval()

    n = len(entries)
    epochs = settings["epochs"]
    one_off = tokenize_seconds + reference_seconds
    amortized = loop_seconds + one_off / epochs
    pairs = pairs_per_entry(method, j)
    return {
        "model": source,
        "rejected_per_entry": j,
        "pairs_per_entry": pairs,
        "optimizer_steps": len(schedule),
        "entries_per_step": len(schedule[0]),
        "pairs_per_step": len(schedule[0]) * pairs,
        "seconds_tokenize": tokenize_seconds,
        "seconds_reference_pass": reference_seconds,
        "seconds_epoch_loop": loop_seconds,
        # What each of `epochs` epochs costs with the one-off tokenization + reference pass shared out.
        "seconds_per_epoch": amortized,
        "seconds_per_epoch_with_whole_reference": loop_seconds + one_off,
        "entries_per_second": n / amortized,
        "entries_per_second_without_reference": n / loop_seconds,
        "entries_per_second_with_whole_reference": n / (loop_seconds + one_off),
        "pairs_per_second": pairs * n / amortized,
        "pairs_per_second_without_reference": pairs * n / loop_seconds,
        "step_flops_first_batch": step_flops,
        "flops_per_entry_per_step": step_flops / len(schedule[0]),
        "reference_flops_first_batch": reference_flops_first_batch,
        "first_step_loss": first_loss,
        "final_step_loss": float(out.loss.detach()),
        **_memory(device, rss_after_load, rss_before_training, cuda_before),
    }


# ----- TRL ----------------------------------------------------------------------------------------


def trl_prompt(vlm: VLM, question: str, context: Sequence[Turn]) -> str:
    """`VLM.prompt_ids`' chat text with ONE image placeholder: TRL's LlavaProcessor expands it."""
    messages = vlm.prompt_messages(question, context, image_text=IMAGE_TOKEN)
    return vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def trl_rows(vlm: VLM, rows: list[dict], method: str) -> dict[str, list]:
    """The pairwise dataset TRL trains on, entry-major: (chosen, dispreferred_k) for DPO, every
    ranked pair (w, l), w < l, of [chosen, dispreferred_1..J] for MLPO's pairs. TRL's vision path
    appends no EOS (its `add_eos` map is in `_prepare_dataset`, skipped for vision datasets), so
    the texts carry it, as `VLM.answer_ids` does."""
    from PIL import Image

    eos = vlm.tokenizer.eos_token
    data: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for row in rows:
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        prompt = trl_prompt(vlm, row["question"], row["context"])
        ranked = [row["answer"]] + [r["text"] for r in row["rejected"]]
        if method in ("trl_dpo", "trl_dpo_checkpointed"):
            pairs = [(0, k) for k in range(1, len(ranked))]
        else:
            pairs = [(w, lose) for w in range(len(ranked)) for lose in range(w + 1, len(ranked))]
        for w, lose in pairs:
            data["images"].append([image])
            data["prompt"].append(prompt)
            data["chosen"].append(ranked[w].strip() + eos)
            data["rejected"].append(ranked[lose].strip() + eos)
    return data


def trl_processor(vlm: VLM):
    from transformers import LlavaProcessor

    config = vlm.model.config
    strategy = config.vision_feature_select_strategy
    # LlavaProcessor: (H/patch)·(W/patch) + num_additional_image_tokens, minus 1 under "default"
    # (the CLS feature dropped); the CLIP tower's CLS is the one additional token.
    return LlavaProcessor(image_processor=vlm.image_processor, tokenizer=vlm.tokenizer,
                          patch_size=config.vision_config.patch_size, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN)


def lora_target_regex(cfg: PreferenceConfig) -> str:
    # A plain list would also wrap the CLIP tower's q_proj/k_proj/v_proj: ours adapts the LM only.
    return r".*language_model.*\.(" + "|".join(re.escape(t) for t in cfg.lora_targets) + r")"


def trl_config_changes(device: torch.device, batch: int, cfg: PreferenceConfig,
                       checkpointing: bool = False) -> dict[str, dict[str, Any]]:
    """Every DPOConfig value set here that differs from TRL's default (or is required), and why."""
    cuda = device.type == "cuda"
    changes = {
        "per_device_train_batch_size": (batch, "pairs per step matched to ours: --batch-entries x pairs per "
                                               "entry, so both take the same optimizer steps over the same pairs"),
        "learning_rate": (cfg.lr, "ours (train.lr); TRL's default is 1e-6. No effect on speed"),
        "beta": (cfg.gamma, "our gamma (train.gamma); equals TRL's default 0.1"),
        "max_length": (None, "no truncation (default 1024): no image token or answer may be cut"),
        "gradient_checkpointing": (checkpointing, "TRL's default (True) in trl_dpo_checkpointed" if checkpointing else
                                   "TRL's default is True; ours does not checkpoint (trl_dpo_checkpointed keeps it)"),
        "bf16": (cuda, "TRL's default is True; ours runs float32 on CPU and bf16 autocast on a GPU"),
        "use_cpu": (not cuda, "run on the CPU when the benchmark does"),
        "num_train_epochs": (1, "one epoch is what is timed"),
        "report_to": ("none", "no tracker"),
        "logging_steps": (10**9, "no logging mid-epoch (TRL's default logs every 10 steps)"),
        "save_strategy": ("no", "no checkpoint written during the timed epoch"),
        "dataloader_num_workers": (0, "in-process collation, as ours (also TRL's default)"),
        "output_dir": ("<temporary folder>", "nothing written into the repository"),
    }
    return {k: {"value": v, "why": why} for k, (v, why) in changes.items()}


def check_tokens(vlm: VLM, batch: dict, data: dict[str, list], rows: list[dict], per_entry: int) -> int:
    """Assert TRL's collated prompt and completions equal our `prompt_ids` / `answer_ids`.

    TRL 1.16's vision collator returns input_ids, attention_mask, pixel_values and
    completion_mask (prompt and completion concatenated, flushed left), no prompt_input_ids: the
    prompt is where attention_mask is 1 and completion_mask is 0. Returns the rows checked.
    """
    ids, attention, completion = batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["completion_mask"].cpu()
    half = ids.shape[0] // 2
    for i in range(half):
        row = rows[i // per_entry]
        prompt = ids[i][(attention[i] == 1) & (completion[i] == 0)].tolist()
        chosen = ids[i][completion[i] == 1].tolist()
        rejected = ids[half + i][completion[half + i] == 1].tolist()
        want_prompt = vlm.prompt_ids(row["question"], row["context"], row["image"])
        if prompt != want_prompt:
            raise AssertionError(f"TRL prompt tokens differ from ours for row {i}: {prompt} vs {want_prompt}")
        for got, text in ((chosen, data["chosen"][i]), (rejected, data["rejected"][i])):
            want = vlm.answer_ids(text.removesuffix(vlm.tokenizer.eos_token))
            if got != want:
                raise AssertionError(f"TRL answer tokens differ from ours for row {i}: {got} vs {want}")
    return half


def run_trl(method: str, settings: dict) -> dict:
    vlm, rows, source, device, rss_after_load = _setup(settings)
    # Imported after the model load, so rss_after_model_load_mib is comparable with ours; what
    # TRL's libraries add is part of its training increment and its peak.
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    cfg = preference_config()
    j = settings["rejected"]
    per_entry = pairs_per_entry(method, j)
    step_entries = min(settings["batch_entries"], len(rows))
    batch_size = step_entries * per_entry
    data = trl_rows(vlm, rows, method)
    dataset = Dataset.from_dict(data)
    changes = trl_config_changes(device, batch_size, cfg, checkpointing=method == "trl_dpo_checkpointed")
    values = {k: v["value"] for k, v in changes.items() if k != "output_dir"}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target_regex(cfg))
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing; the warning is about TRL's field, set to False here.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = DPOConfig(output_dir=out_dir, **values)
        start = time.perf_counter()
        trainer = DPOTrainer(model=vlm.model, ref_model=None, args=args, train_dataset=dataset,
                             processing_class=trl_processor(vlm), peft_config=lora)
        setup_seconds = time.perf_counter() - start
        adapters = seed_adapter(trainer.model, settings["adapter_seed"])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before_training = proc_status_mib("VmRSS")
        cuda_before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None

        # The first batch in dataset order (the same pairs as ours' first batch): token check,
        # FLOPs of one forward + backward through TRL's own compute_loss, and the step-0 loss.
        first = trainer.data_collator([dict(dataset[i]) for i in range(min(batch_size, len(dataset)))])
        rows_checked = check_tokens(vlm, first, data, rows, per_entry)
        first = trainer._prepare_inputs(first)
        trainer.model.train()

        def forward_backward() -> float:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(trainer.model, first)
            loss.backward()
            return float(loss.detach())

        first_loss, step_flops = count_flops(forward_backward)
        trainer.model.zero_grad(set_to_none=True)
        for values_list in trainer._metrics["train"].values():
            values_list.clear()  # the untimed batch's metrics stay out of the epoch's logs

        synchronize(device)
        start = time.perf_counter()
        with redirect_stdout(sys.stderr):  # the trainer prints its final logs: keep stdout for the JSON
            result = trainer.train()
        synchronize(device)
        train_seconds = time.perf_counter() - start

    n = len(rows)
    steps = trainer.state.global_step
    return {
        "model": source,
        "rejected_per_entry": j,
        "pairs_per_entry": per_entry,
        "dataset_rows": len(dataset),
        "optimizer_steps": steps,
        "entries_per_step": step_entries,
        "pairs_per_step": batch_size,
        "seconds_trainer_setup": setup_seconds,
        "seconds_per_epoch": train_seconds,
        "entries_per_second": n / train_seconds,
        "pairs_per_second": len(dataset) / train_seconds,
        # transformers' own train_runtime: from the first step on, without train()'s set-up
        # (data loader, optimizer, accelerate prepare); for reference, the headline is the wall time.
        "seconds_trl_train_runtime": result.metrics["train_runtime"],
        "entries_per_second_trl_train_runtime": n / result.metrics["train_runtime"],
        "step_flops_first_batch": step_flops,
        "flops_per_entry_per_step": step_flops / step_entries,
        "first_step_loss": first_loss,
        "train_loss_mean": result.training_loss,
        "trainable_parameters": trainable,
        "lora_matrices_seeded": adapters,
        "tokens_match_ours": True,
        "token_rows_checked": rows_checked,
        "trl_config": changes,
        **_memory(device, rss_after_load, rss_before_training, cuda_before),
    }


def run_method(method: str, settings: dict) -> dict:
    """One method, one epoch (module level, so `machine.run_isolated` can run it in a spawned process)."""
    return run_trl(method, settings) if method.startswith("trl_") else run_ours(method, settings)


# ----- report -------------------------------------------------------------------------------------


def compare(results: dict[str, dict], device: torch.device, profile: str) -> tuple[dict, dict, dict]:
    """speedup_vs_trl, peak_memory_ratio and the issue's targets (met / not met)."""
    memory_key = "cuda_max_memory_allocated_mib" if device.type == "cuda" else "peak_rss_mib"
    pairs = {"dpo_j3": ("ours_dpo", "trl_dpo"), "mlpo_vs_trl_all_ranked_pairs": ("ours_mlpo", "trl_dpo_mlpo_pairs"),
             "mlpo_vs_trl_dpo": ("ours_mlpo", "trl_dpo"), "dpo_j3_trl_checkpointed": ("ours_dpo", "trl_dpo_checkpointed")}
    speedup, memory, targets = {}, {}, {}
    for name, (ours, trl) in pairs.items():
        if ours not in results or trl not in results:
            continue
        o, t = results[ours], results[trl]
        speedup[name] = {
            "ours": ours, "trl": trl,
            "entries_per_second": o["entries_per_second"] / t["entries_per_second"],
            "entries_per_second_without_reference": o["entries_per_second_without_reference"] / t["entries_per_second"],
            "entries_per_second_with_whole_reference": o["entries_per_second_with_whole_reference"] / t["entries_per_second"],
            "entries_per_second_vs_trl_train_runtime": o["entries_per_second"] / t["entries_per_second_trl_train_runtime"],
        }
        if o.get(memory_key) and t.get(memory_key):
            memory[name] = {"ours": ours, "trl": trl, "measure": memory_key,
                            "peak": o[memory_key] / t[memory_key]}
            if device.type == "cpu":
                inc_o = o[memory_key] - o["rss_after_model_load_mib"]
                inc_t = t[memory_key] - t["rss_after_model_load_mib"]
                memory[name]["increment_over_model_load"] = inc_o / inc_t if inc_t > 0 else None
        if name in ("mlpo_vs_trl_dpo", "dpo_j3_trl_checkpointed"):
            continue
        fast = speedup[name]["entries_per_second"] >= TARGET_SPEEDUP
        small = memory.get(name, {}).get("peak")
        targets[name] = {
            "speedup": round(speedup[name]["entries_per_second"], 2),
            "speedup_target": TARGET_SPEEDUP,
            "memory_ratio": None if small is None else round(small, 3),
            "memory_ratio_target": TARGET_MEMORY_RATIO,
            "met": bool(fast and small is not None and small <= TARGET_MEMORY_RATIO),
            "applies": profile == "demo" and device.type == "cpu",
        }
    return speedup, memory, targets


def measure(profile: str, entries: int, rejected: int, batch_entries: int, epochs: int, device: str,
            threads: int, methods: list[str], in_process: bool = False) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if any(m.startswith("trl_") for m in methods) and importlib.util.find_spec("trl") is None:
        raise typer.BadParameter("the trl_* methods need TRL: pip install -e '.[bench]'")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    cfg = preference_config()
    epochs = epochs or cfg.epochs
    settings = {"profile": profile, "entries": entries, "rejected": rejected, "batch_entries": batch_entries,
                "epochs": epochs, "device": dev.type, "threads": threads, "adapter_seed": cfg.seed}
    peak = matmul_peak(dev)
    results: dict[str, dict] = {}
    for method in methods:
        typer.echo(f"{method} ...", err=True)
        if in_process:
            out = run_method(method, settings)
            out["peak_rss_mib"] = None  # one process for all methods: no per-method peak
        else:
            out = run_isolated(run_method, method, settings)
        steps = out["optimizer_steps"]
        seconds = out["seconds_epoch_loop"] if method.startswith("ours_") else out["seconds_per_epoch"]
        out["utilization"] = utilization(out["step_flops_first_batch"] * steps, seconds, peak)
        results[method] = out
        typer.echo(f"{method}: {out['entries_per_second']:.2f} entries/s, "
                   f"{out['pairs_per_second']:.2f} pairs/s", err=True)
    speedup, memory, targets = compare(results, dev, profile)
    sanity = None
    if "ours_dpo" in results and "trl_dpo" in results:
        a, b = results["ours_dpo"]["first_step_loss"], results["trl_dpo"]["first_step_loss"]
        sanity = {"ours_dpo_first_step_loss": a, "trl_dpo_first_step_loss": b, "log_2": math.log(2),
                  "abs_difference": abs(a - b), "agree": abs(a - b) < 1e-4,
                  "note": "same first batch (entries 0..E-1, their J pairs), same initial adapter (LoRA A and B "
                          "drawn, so the policy differs from the adapter-disabled reference and the loss is "
                          "not log 2): equal losses mean both sides score the same tokens the same way"}
        if "ours_mlpo" in results and "trl_dpo_mlpo_pairs" in results:
            # MLPO sums an entry's J + J(J-1)/2 pair terms; TRL averages its rows: a factor of pairs/entry.
            mlpo = results["ours_mlpo"]["first_step_loss"]
            trl_pairs = results["trl_dpo_mlpo_pairs"]["first_step_loss"] * pairs_per_entry("ours_mlpo", rejected)
            sanity.update({"ours_mlpo_first_step_loss": mlpo, "trl_mlpo_pairs_first_step_loss_times_pairs": trl_pairs,
                           "mlpo_agree": abs(mlpo - trl_pairs) < 1e-3})
    source = next(iter(results.values()))["model"] if results else None
    return {
        "profile": profile,
        "model": source,
        "device": device_name(dev),
        "dtype": "bf16 autocast" if dev.type == "cuda" else "float32",
        "torch_threads": torch.get_num_threads(),
        "trl_version": importlib.metadata.version("trl") if importlib.util.find_spec("trl") else None,
        "isolated_processes": not in_process,
        "entries": entries,
        "rejected_per_entry": rejected,
        "batch_entries": batch_entries,
        "epochs_amortized_over": epochs,
        "pairs_per_entry": {m: pairs_per_entry(m, rejected) for m in methods},
        "matmul_peak": peak,
        "results": results,
        "speedup_vs_trl": speedup,
        "peak_memory_ratio": memory,
        "targets": targets,
        "first_step_loss_check": sanity,
        "trl_cannot": TRL_CANNOT,
        "notes": [
            "ours: seconds_per_epoch = epoch loop + (tokenization + reference pass) / epochs; TRL: the wall "
            "time of trainer.train() for one epoch (its collation, per-step reference forward and setup of "
            "the loop included, nothing subtracted).",
            "FLOPs: one forward + backward on the first batch under torch's FlopCounterMode (TRL: through "
            "trainer.compute_loss, its reference forward included; ours: the step only, the reference "
            "table's FLOPs for that batch are reference_flops_first_batch); utilization multiplies it by "
            "the optimizer steps of the epoch.",
            "Losses without the NLL term (train.nll_weight) on both sides (TRL's rpo_alpha is unset), "
            "unweighted (TRL has no per-response weights).",
            "ours_dpo averages its loss over pairs as TRL does; ours_mlpo sums an entry's 6 terms and "
            "averages entries (HSCR), so its first-step loss is 6 x TRL's on the same 6 ranked pairs.",
            "Optimizers: ours torch.optim.AdamW, TRL its default adamw_torch_fused; both clip the gradient "
            "norm at 1.0; TRL shuffles its rows (its default), ours steps through entries in order.",
        ],
    }


@app.command()
def main(
    profile: str = typer.Option("tiny", help="tiny (built in code, seconds) | demo (models/sft if present, else "
                                "build_demo) | llava-med-7b[:layers=N] (random weights, LLaVA-Med v1.5's shape)"),
    entries: int = typer.Option(32, help="N entries, one epoch over them per method"),
    rejected: int = typer.Option(3, help="J dispreferred answers per entry"),
    batch_entries: int = typer.Option(0, help="entries per optimizer step for ours (TRL: x pairs per entry rows); "
                                              "0 = params.yaml train.batch_size"),
    epochs: int = typer.Option(0, help="epochs our one-off reference pass is amortized over; 0 = params.yaml train.epochs"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(
        1, help="torch CPU threads in every process; 0 keeps torch's default. 1 by default because on a shared "
                "machine torch's spinning worker threads make CPU timings erratic"),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated, from " + ", ".join(METHODS)),
    in_process: bool = typer.Option(False, help="run the methods one after another in this process (tests): no "
                                                "per-method peak memory"),
    out: Path = typer.Option(ROOT / "reports" / "benchmarks" / "train_vs_trl.json"),
) -> dict:
    if profile not in ("tiny", "demo") and not is_shape(profile):
        raise typer.BadParameter(f"--profile must be tiny, demo or llava-med-7b[:layers=N], got {profile!r}")
    batch_entries = batch_entries or preference_config().batch_size
    report = measure(profile, entries, rejected, batch_entries, epochs, device, threads,
                     [m.strip() for m in methods.split(",") if m.strip()], in_process)
    save_run("train_vs_trl", f"{profile}/{pick_device(device).type}", report, out=out)
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    app()
