"""Where a model named in params.yaml comes from, checked before anything is loaded.

A model param holds a packaged name (e.g. `smollm2`, `demo`), a local folder or a hub id. A local
folder must lie under the folder dvc.yaml lists as the stage's model dependency (e.g.
`models/judges` for `score`), so that replacing its weights makes `dvc status` report the stage
as changed. A hub id is passed through: DVC sees only the id, so pin what you can (docs/models.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from pipeline.errors import InputNotFoundError, ModelLoadError, ParamsError, PipelineError

# A Hugging Face hub repository id, `org/name` (huggingface_hub's rules: no "--" or "..").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(value: str) -> bool:
    """True for `org/name`, unless `org` is a local folder (then it is a path, e.g. `models/sft`)."""
    if not _HUB_ID.fullmatch(value) or "--" in value or ".." in value:
        return False
    return not Path(value.split("/")[0]).is_dir()


def check_model_source(value: str, key: str, root: str | Path, packaged: Iterable[str] = ()) -> str:
    """`value` if it is a packaged name, a hub id or a folder under `root`; a clear error otherwise."""
    if value in set(packaged):
        return value
    path = Path(value)
    if path.exists():
        root = Path(root)
        if not path.resolve().is_relative_to(root.resolve()):
            raise ParamsError(
                f"`{key}` is the local folder {value}, outside {root}/, the folder dvc.yaml watches for this "
                f"stage: DVC would not notice its weights change. Move or copy it under {root}/ "
                f"(`dvc add {root}/<name>` for large weights) and set `{key}: {root}/<name>`"
            )
        if not path.is_dir():
            raise ParamsError(f"`{key}`: {value} is a file; a model is a folder (config.json + weights)")
        return value
    if is_hub_id(value):
        return value
    names = ", ".join(sorted(packaged))
    raise InputNotFoundError(
        f"`{key}`: {value!r} is not a local folder, not a hub id (org/name)"
        + (f" and not one of the packaged models ({names})" if names else "")
    )


@contextmanager
def model_load_errors(source: str, fix: str) -> Iterator[None]:
    """Turn a failure to load `source` into a `ModelLoadError` that names it and says what to do.

    A local folder that fails is incomplete or corrupt (`fix` says how to re-create it); a hub id
    that fails is mistyped, gated, or the hub cannot be reached (no network, HF_HUB_OFFLINE).
    """
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        if isinstance(e, PipelineError):
            raise
        if Path(source).exists():
            raise ModelLoadError(
                f"{source}: cannot load the model ({type(e).__name__}: {e}); the folder is incomplete or "
                f"corrupt: {fix}"
            ) from e
        raise ModelLoadError(
            f"{source}: cannot load it from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}); check the "
            "id and the network (offline, HF_HUB_OFFLINE=1 allows only cached models), or put the model in a "
            "local folder"
        ) from e
