"""Reading `params.yaml`: each stage reads its own section (and the few top-level keys it declares)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-05` (no dot) is a string; `dvc exp run -S train.lr=2e-5`
    writes exactly that. Read such numbers as floats, as YAML 1.2 and DVC itself do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stages from the repository root")
    with path.open() as f:
        params = yaml.load(f, Loader=_Loader) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise KeyError(f"params.yaml has no `{name}:` section")
    return params[name]
