"""The one path from `params.yaml` to code.

Every stage and every library concept owns one typed, frozen config (a `Config` subclass, a
pydantic model): each field has a type, a one-line help text and its constraints; cross-field
checks live in the class's validators. `params.yaml` is the only home of the values: the config
classes declare no defaults, and a key missing from params.yaml is an error, so a value can
never differ between the file, the code and a fallback.

`load_config` reads one section of a params file into its config class and turns every problem
(unknown key, with the nearest valid one; missing key; wrong type; out-of-range value) into one
`ParamsError` that names the file and the key, before any model or data is loaded.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ParamsError

PARAMS_FILE = "params.yaml"

# The top-level keys of params.yaml: one section per stage, plus the few scalars kept at the top
# so that `dvc exp run -S mask_ratio=0.5` stays short. A key outside this set is a typo.
SECTIONS = ("prepare", "sft", "mine", "sample", "rerank", "score", "train", "evaluate", "judged_eval", "html_report")
TOP_LEVEL_SCALARS = ("mask_ratio",)

# The config class of each section, imported on demand (`section_class`).
SECTION_CONFIGS = {
    "prepare": "pipeline.data.prepare:PrepareConfig",
    "sft": "pipeline.training.sft:SFTConfig",
    "mine": "pipeline.mining:MineConfig",
    "sample": "pipeline.self_contrast:SampleConfig",
    "rerank": "pipeline.rerank:RerankConfig",
    "score": "pipeline.judges.panel:ScoreConfig",
    "train": "pipeline.training.preference:PreferenceConfig",
    "evaluate": "pipeline.evaluation:EvaluateConfig",
    "judged_eval": "pipeline.judged_evaluation:JudgedEvalConfig",
    "html_report": "pipeline.html_report:HtmlReportConfig",
}


class Config(BaseModel):
    """Base of every config: frozen, strict types, unknown keys rejected, no defaults.

    A section config may also read top-level scalars (`top_level`, e.g. `mask_ratio`) and values
    of other sections that its cross-section checks need (`reads`: {context label: dotted key},
    e.g. `rerank.j <= sample.k`); the stage must declare those params in dvc.yaml too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)
    top_level: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for fingerprints, metrics and saved run configs)."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> Config:
        """A validated copy with `changes` applied (model_copy would skip validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})


C = TypeVar("C", bound=Config)


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-05` (no dot) is a string; `dvc exp run -S train.lr=2e-5`
    writes exactly that. Read such numbers as floats, as YAML 1.2 and DVC itself do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a mapping; a missing or malformed file is a `ParamsError`."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (stages run from the repository root)")
    try:
        params = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}".replace("<unicode string>", str(path))) from None
    if params is None:
        raise ParamsError(f"{path}: the file is empty; it needs the sections {list(SECTIONS)}")
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(params).__name__}")
    unknown = sorted(set(params) - set(SECTIONS) - set(TOP_LEVEL_SCALARS))
    if unknown:
        raise ParamsError(_unknown_message(path, unknown[0], "", [*SECTIONS, *TOP_LEVEL_SCALARS]))
    return params


def section_config(
    cls: type[C],
    params: Mapping[str, Any],
    name: str,
    *,
    source: str | Path = PARAMS_FILE,
) -> C:
    """Validate section `name` of already-loaded `params` into `cls`, with the top-level scalars
    and other sections' values the class declares (`Config.top_level`, `Config.reads`)."""
    if name not in params:
        raise ParamsError(f"{source}: no `{name}:` section; it needs the keys {sorted(cls.model_fields)}")
    values = params[name]
    if not isinstance(values, Mapping):
        raise ParamsError(f"{source}: `{name}` must be a mapping of keys, got {values!r}")
    values = dict(values)
    top_level = cls.top_level
    for key in top_level:
        if key in values:
            raise ParamsError(f"{source}: `{name}.{key}` belongs at the top level of the file as `{key}`, not under `{name}:`")
        if key not in params:
            raise ParamsError(f"{source}: `{key}` is missing at the top level: {_help(cls, (key,))}")
        values[key] = params[key]
    ctx: dict[str, Any] = {}
    for label, dotted in cls.reads.items():
        ctx[label] = _lookup(params, dotted, source)
    return _validate(cls, values, prefix=name, source=source, context=ctx)


def load_config(cls: type[C], path: str | Path, name: str) -> C:
    """Read section `name` of the params file at `path` into `cls` (see `section_config`)."""
    return section_config(cls, load_params(path), name, source=path)


def build_config(cls: type[C], values: Mapping[str, Any], where: str = "config", **context: Any) -> C:
    """Validate `values` built in code (not from a file) into `cls`, with the same messages."""
    return _validate(cls, dict(values), prefix=where, source="config", context=context)


def section_class(name: str) -> type[Config]:
    """The config class that reads section `name`."""
    import importlib

    module, _, cls = SECTION_CONFIGS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def project_params_path() -> Path:
    """The repository's own params.yaml (tests and benchmarks start from the project's values)."""
    return Path(__file__).resolve().parents[1] / PARAMS_FILE


def project_config(cls: type[C], name: str, /, **overrides: Any) -> C:
    """Section `name` of the project's params.yaml, with `overrides` applied, validated into `cls`.

    Top-level scalars a config reads (e.g. `mask_ratio`) can be overridden by name too.
    """
    params = load_params(project_params_path())
    section = dict(params[name])
    for key in cls.top_level:
        section[key] = params[key]
    section.update(overrides)
    context = {label: _lookup(params, dotted, "params.yaml") for label, dotted in cls.reads.items()}
    return build_config(cls, section, where=name, **context)


# ----- messages -----------------------------------------------------------------------------------


def _lookup(params: Mapping[str, Any], dotted: str, source: str | Path) -> Any:
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ParamsError(f"{source}: `{dotted}` is missing")
        value = value[part]
    return value


def _validate(cls: type[C], values: dict[str, Any], *, prefix: str, source: str | Path,
              context: Mapping[str, Any]) -> C:
    top_level = cls.top_level
    try:
        return cls.model_validate(values, context=dict(context))
    except ValidationError as exc:
        lines = [_describe(cls, err, prefix, top_level) for err in exc.errors()]
        lines = list(dict.fromkeys(lines))
        head = f"{source}: " + (lines[0] if len(lines) == 1 else f"{len(lines)} problems:")
        body = "" if len(lines) == 1 else "\n" + "\n".join(f"  - {line}" for line in lines)
        raise ParamsError(head + body) from None


def _dotted(prefix: str, loc: Iterable[Any], top_level: tuple[str, ...]) -> str:
    loc = list(loc)
    if loc and loc[0] in top_level:
        prefix = ""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(cls: type[Config], err: Mapping[str, Any], prefix: str, top_level: tuple[str, ...]) -> str:
    raw_loc, kind = tuple(err["loc"]), err["type"]
    loc = _strip_tags(cls, raw_loc)
    key = _dotted(prefix, loc, top_level)
    if kind == "extra_forbidden":
        siblings = _field_names(cls, raw_loc[:-1])
        return _unknown_message(None, str(loc[-1]), _dotted(prefix, loc[:-1], top_level), siblings)
    if kind == "union_tag_not_found":
        given = err.get("input") if isinstance(err.get("input"), Mapping) else {}
        valid = _field_names(cls, raw_loc)
        unknown = sorted(set(given) - set(valid))
        if unknown:
            return _unknown_message(None, str(unknown[0]), key, valid)
        tag = err.get("ctx", {}).get("discriminator", "").strip("'")
        return f"`{key}.{tag}` is missing: add it"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"`{key}.{ctx.get('discriminator', '').strip(chr(39))}` must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
    if kind == "missing":
        return f"`{key}` is missing: add it ({_help(cls, loc)})"
    message = str(err["msg"])
    for old, new in (("Input should be", "must be"), ("Value error, ", ""), ("Assertion failed, ", "")):
        message = message.replace(old, new)
    got = err.get("input")
    shown = "" if kind.startswith("value_error") or isinstance(got, (dict, Config)) else f" (got {got!r})"
    if not loc:
        return f"`{prefix}`: {message}"
    return f"`{key}` {message}{shown}"


def _unknown_message(source: str | Path | None, key: str, parent: str, valid: list[str]) -> str:
    where = f"{parent}.{key}" if parent else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{parent + '.' if parent else ''}{close[0]}`?" if close else ""
    text = f"unknown key `{where}`{hint} (valid keys: {', '.join(sorted(valid))})"
    return f"{source}: {text}" if source is not None else text


# Navigating a config class along an error location, to list the valid keys at a level and to
# find a field's help text.

def _unwrap(annotation: Any) -> list[Any]:
    """The config classes an annotation can hold (through Optional, Annotated, list, dict, unions)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _walk(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[type[BaseModel]], tuple[Any, ...]]:
    """The classes reached by following `loc` (tags of tagged unions dropped), and the cleaned loc."""
    current: list[type[BaseModel]] = [cls]
    clean: list[Any] = []
    pending_union = False
    for part in loc:
        if isinstance(part, int):
            clean.append(part)
            continue
        if pending_union:
            tagged = [c for c in current if _tag(c) == part]
            if tagged:
                current, pending_union = tagged, False
                continue
        clean.append(part)
        nxt: list[type[BaseModel]] = []
        for c in current:
            field = c.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_unwrap(field.annotation))
        pending_union = len(nxt) > 1
        current = nxt or current
    return current, tuple(clean)


def _tag(cls: type[BaseModel]) -> Any:
    field = cls.model_fields.get("backend")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None


def _strip_tags(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return _walk(cls, loc)[1]


def _field_names(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    classes, _ = _walk(cls, loc) if loc else ([cls], ())
    return sorted({name for c in classes for name in c.model_fields})


def _help(cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    classes, _ = _walk(cls, loc[:-1]) if len(loc) > 1 else ([cls], ())
    for c in classes:
        field = c.model_fields.get(str(loc[-1]))
        if field is not None and field.description:
            return field.description
    return "see docs/params.md"


# ----- reference ----------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation)).replace("NoneType", "null")
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return {"str": "text", "int": "integer", "float": "number", "bool": "true/false"}.get(
            annotation.__name__, "mapping" if issubclass(annotation, BaseModel) else annotation.__name__)
    return str(annotation)


def _limits(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _rows(cls: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in cls.model_fields.items():
        help_text = (field.description or "").replace("|", "\\|")
        key = name if name in getattr(cls, "top_level", ()) else f"{prefix}.{name}"
        nested = _unwrap(field.annotation)
        if nested and typing.get_origin(field.annotation) is not dict:
            label = "list of mappings" if typing.get_origin(field.annotation) in (list, tuple) else "mapping"
            rows.append(f"| `{key}` | {label} | | {help_text} |")
            for member in nested:
                tag = _tag(member)
                sub = f"{key}[]" if label.startswith("list") else key
                if tag is not None:
                    rows.append(f"| `{sub}` with `backend: {tag}` | | | {member.__doc__.strip().splitlines()[0]} |")
                rows.extend(_rows(member, sub))
            continue
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_limits(field)} | {help_text} |")
    return rows


def params_reference() -> str:
    """docs/params.md: every key of every section, with its type, limits and help (generated)."""
    lines = [
        "# Every parameter",
        "",
        "Generated from the config classes by `python -m pipeline.params > docs/params.md`; a test",
        "checks that this page matches the code. The values live in `params.yaml` only: every key",
        "below must be there, and a key that is not listed here is an error that names the nearest",
        "valid key. Cross-field checks (e.g. `rerank.j <= sample.k`) are listed under each section.",
    ]
    for name in SECTIONS:
        cls = section_class(name)
        lines += ["", f"## `{name}:`", "", (cls.__doc__ or "").strip().splitlines()[0], ""]
        if cls.reads:
            lines += [f"Also reads {', '.join(f'`{v}`' for v in cls.reads.values())} for its checks.", ""]
        lines += ["| key | type | limits | what it is |", "|---|---|---|---|", *_rows(cls, name)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(params_reference(), end="")
