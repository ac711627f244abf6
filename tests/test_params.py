"""The one path from params.yaml to code: every key checked, every value class rejected with a
message that names the key, before anything is loaded."""

from __future__ import annotations

import copy
import difflib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import (
    SECTIONS,
    load_config,
    load_params,
    params_reference,
    project_params_path,
    section_class,
    section_config,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(project_params_path())


def key_paths(value, prefix: tuple = ()):
    """Every key path of a nested mapping (into lists of mappings too)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield (*prefix, key)
            yield from key_paths(sub, (*prefix, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from key_paths(sub, (*prefix, i))


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def typo(key: str) -> str:
    return key[:-1] if key.endswith("s") and len(key) > 2 else key + "s"


def rename(params: dict, path: tuple, new: str) -> dict:
    params = copy.deepcopy(params)
    parent = params
    for part in path[:-1]:
        parent = parent[part]
    parent[new] = parent.pop(path[-1])
    return params


def load_section_of(params: dict, path: tuple):
    section = path[0] if path[0] in SECTIONS else "sample"  # top-level scalars: mask_ratio -> sample
    return section_config(section_class(section), params, section)


ALL_KEYS = [p for p in key_paths(PARAMS) if not (len(p) > 2 and p[:2] == ("sft", "vision"))]


def test_the_project_params_load_into_every_section():
    for name in SECTIONS:
        assert section_config(section_class(name), PARAMS, name).to_dict()


@pytest.mark.parametrize("path", ALL_KEYS, ids=[dotted(p) for p in ALL_KEYS])
def test_a_typo_in_any_key_names_the_key_and_the_nearest_valid_one(tmp_path, path):
    wrong = typo(str(path[-1]))
    params = rename(PARAMS, path, wrong)
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ParamsError) as failure:
        load_section_of(load_params(file), path)
    message = str(failure.value)
    bad, good = dotted((*path[:-1], wrong)), dotted(path)
    assert f"unknown key `{bad}`" in message, message
    assert f"did you mean `{good}`?" in message, message


@pytest.mark.parametrize("path", ALL_KEYS, ids=[dotted(p) for p in ALL_KEYS])
def test_a_missing_key_is_named(path):
    params = copy.deepcopy(PARAMS)
    parent = params
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    expected = f"no `{path[0]}:` section" if path[0] in SECTIONS and len(path) == 1 else f"`{dotted(path)}` is missing"
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_section_of(params, path)


def changed(**changes) -> dict:
    params = copy.deepcopy(PARAMS)
    for dotted_key, value in changes.items():
        parts = dotted_key.split("__")
        parent = params
        for part in parts[:-1]:
            parent = parent[int(part)] if part.isdigit() else parent[part]
        parent[parts[-1]] = value
    return params


INVALID = [
    # (section, change, message)
    ("sample", {"sample__k": 0}, "`sample.k` must be greater than or equal to 1 (got 0)"),
    ("sample", {"mask_ratio": 1.5}, "`mask_ratio` must be less than 1 (got 1.5)"),
    ("sample", {"mask_ratio": -0.1}, "`mask_ratio` must be greater than or equal to 0"),
    ("sample", {"sample__mode": "sample"}, "`sample.mode` must be 'replace' or 'decode' (got 'sample')"),
    ("rerank", {"rerank__j": 10}, "rerank.j (10) is more than sample.k (6)"),
    ("rerank", {"rerank__min_keep": 4}, "rerank.min_keep (4) must be <= rerank.j (3)"),
    ("prepare", {"prepare__phantom__n_test": 0}, "`prepare.phantom.n_test` must be greater than or equal to 1"),
    ("prepare", {"prepare__files__train__path": "../elsewhere/train.json"}, "relative to files.root without '..'"),
    ("prepare", {"prepare__source": "hub"}, "`prepare.source` must be 'phantom' or 'files'"),
    ("sft", {"sft__language_model": "lorra"}, "`sft.language_model` must be 'lora', 'full' or 'frozen'"),
    ("sft", {"sft__vision": {"num_layers": 3}}, "unknown CLIPVisionConfig key(s) ['num_layers']"),
    ("train", {"train__batch_size": "eight"}, "`train.batch_size` must be a valid integer (got 'eight')"),
    ("train", {"train__loss": "ipo"}, "`train.loss` must be 'dpo' or 'mlpo' (got 'ipo')"),
    ("train", {"train__lr": 0.0}, "`train.lr` must be greater than 0"),
    ("train", {"train__explicit": False, "train__implicit": False}, "explicit and implicit both false"),
    ("train", {"train__mixed_precision": "fp8"}, "`train.mixed_precision` must be"),
    ("train", {"train__epochs": True}, "`train.epochs` must be a valid integer (got True)"),
    ("evaluate", {"evaluate__batch_size": 0}, "`evaluate.batch_size` must be greater than or equal to 1 (got 0)"),
    ("mine", {"mine__strategy": "hardest"}, "`mine.strategy` must be 'balanced', 'random' or 'hard'"),
    ("mine", {"mine__hard__neighbours": -1}, "`mine.hard.neighbours` must be greater than or equal to 0"),
    ("score", {"score__weights__clip": [1.25, 0.75]}, "0 <= low < high"),
    ("score", {"score__judges__0__backend": "vllm"}, "`score.judges[0].backend` must be one of 'hf', 'openai'"),
    ("score", {"score__judges__0__batch_size": 0}, "`score.judges[0].batch_size` must be greater than or equal to 1"),
    ("score", {"score__judges": []}, "at least one judge"),
    ("score", {"score__rounds": 2.5}, "`score.rounds` must be a valid integer (got 2.5)"),
]


@pytest.mark.parametrize("section, change, message", INVALID, ids=[m for _, _, m in INVALID])
def test_each_invalid_value_class_fails_with_the_key_named(section, change, message):
    with pytest.raises(ParamsError) as failure:
        section_config(section_class(section), changed(**change), section)
    assert message in str(failure.value)


def test_several_problems_are_listed_at_once():
    with pytest.raises(ParamsError) as failure:
        section_config(section_class("train"), changed(train__batch_size=0, train__gamma=-1), "train")
    message = str(failure.value)
    assert "2 problems" in message and "`train.batch_size`" in message and "`train.gamma`" in message


def test_file_level_problems(tmp_path):
    file = tmp_path / "params.yaml"
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(file)
    file.write_text("")
    with pytest.raises(ParamsError, match="the file is empty"):
        load_params(file)
    file.write_text("sample: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(file)
    file.write_text(yaml.safe_dump({**PARAMS, "mask_ratoi": 0.5}))
    with pytest.raises(ParamsError, match="unknown key `mask_ratoi`; did you mean `mask_ratio`"):
        load_params(file)
    file.write_text("\ufeff" + yaml.safe_dump(PARAMS))  # a byte-order mark is read
    assert load_config(section_class("evaluate"), file, "evaluate").batch_size == PARAMS["evaluate"]["batch_size"]


def test_mask_ratio_belongs_at_the_top_level():
    params = changed(sample__mask_ratio=0.5)
    with pytest.raises(ParamsError, match="`sample.mask_ratio` belongs at the top level"):
        section_config(section_class("sample"), params, "sample")


def test_configs_are_frozen_and_replace_validates():
    config = section_config(section_class("sample"), PARAMS, "sample")
    with pytest.raises(Exception, match="frozen"):
        config.k = 3
    assert config.replace(k=3).k == 3
    with pytest.raises(Exception, match="greater than or equal to 1"):
        config.replace(k=0)


def test_params_reference_is_up_to_date():
    assert (REPO / "docs" / "params.md").read_text() == params_reference(), (
        "docs/params.md is stale: run `python -m pipeline.params > docs/params.md`"
    )


def test_stages_declare_exactly_what_their_config_reads():
    """dvc.yaml lists, per stage, the section, its top-level scalars and the other sections' keys it reads."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage (evaluate@<model>) declares them in its template
        if name == "report":  # the log-prob gaps: their batch size, the held-out sample and the sampler's keys
            sample_keys = {"mode", "mask_strategy", "n_sensitive", "k", "beta", "plausibility", "min_plausible",
                           "temperature", "max_new_tokens", "seed", "batch_size"}
            # every key that shapes a sampled candidate (the rest of `sample:` picks another source or adds
            # the visual dispreferred, which the held-out sampling never uses)
            assert sample_keys | {"source", "external", "visual_dispreference", "mask_ratio"} == set(
                section_class("sample").model_fields)
            assert set(stage["params"]) == {"evaluate.batch_size", "evaluate.heldout_gap", "mask_ratio",
                                            *(f"sample.{k}" for k in sample_keys)}
            continue
        section = "train" if name == "train" else name
        cls = section_class(section)
        expected = {section, *cls.top_level, *cls.reads.values()}
        assert set(stage["params"]) == expected, name


def test_no_default_of_a_param_outside_params_yaml():
    """Config fields have no defaults: params.yaml is the only home of every value."""
    for name in SECTIONS:
        stack = [section_class(name)]
        while stack:
            cls = stack.pop()
            for field_name, field in cls.model_fields.items():
                assert field.is_required(), f"{cls.__name__}.{field_name} has a default"
                assert field.description, f"{cls.__name__}.{field_name} has no help text"
                from pipeline.params import _unwrap

                stack.extend(_unwrap(field.annotation))


def parse_python(file: Path):
    """`ast.parse`, once more if CPython 3.11.7 raises its spurious "AST constructor recursion depth
    mismatch": its AST state is shared by threads, and any thread formatting a traceback parses
    source (cpython gh-106905). A real syntax error raises the same way both times."""
    import ast

    try:
        return ast.parse(file.read_text())
    except SystemError:
        return ast.parse(file.read_text())


def test_no_library_function_defaults_a_param():
    """No function in pipeline/ gives a default to an argument named like a params.yaml key:
    such a default would be a second home for the value (the `grep` check of the params issue)."""
    import ast

    names: set[str] = set()

    def collect(value):
        if isinstance(value, dict):
            for key, sub in value.items():
                names.add(key)
                collect(sub)
        elif isinstance(value, list):
            for sub in value:
                collect(sub)

    collect(PARAMS)
    # keys that name structure, not values
    names -= {"model", "name", "role", "backend", "path", "format", "train", "test", "files", "phantom", "judges",
              "weights", "request_retry", "vision",
              "closed", "open",  # answer types (evaluate.max_new_tokens.<type>): `closed=` flags a question
              "where"}  # prepare.files.<split>.where, a row filter (a mapping); `where=` elsewhere names a place
    found = []
    for file in sorted((REPO / "pipeline").rglob("*.py")):
        if file.name == "params.py":
            continue
        for node in ast.walk(parse_python(file)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults, strict=True))
            keyword = [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in positional + keyword:
                if arg.arg in names and not (isinstance(default, ast.Constant) and default.value is None):
                    found.append(f"{file.relative_to(REPO)}:{node.lineno} {node.name}({arg.arg}=...)")
    assert not found, found


@pytest.mark.parametrize(("override", "line"), [
    ("mask_ratio=0.5", "mask_ratio: 0.5"),
    ("sft.epochs=2", "  epochs: 2"),
    ("sft.system_prompt=null", "  system_prompt:"),
    ("prepare.files.skip_bad=true", "    skip_bad: true"),
    ("score.request_retry.max_retries=2", "    max_retries: 2"),
    ("train.max_rejected=null", "  max_rejected:"),
    ("evaluate.max_rows=10", "  max_rows: 10"),
    ("evaluate.max_new_tokens.open=24", "  max_new_tokens: {closed: 5, open: 24}"),
])
def test_dvc_exp_run_set_param_changes_only_that_line(tmp_path, override, line):
    """`dvc exp run -S` rewrites params.yaml with its own YAML writer (dvc.utils.hydra.apply_overrides,
    what -S calls): params.yaml is written in that style, so the only change is the line set."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(project_params_path(), path)
    before = path.read_text().splitlines()
    apply_overrides(str(path), [override])
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1, "\n".join(difflib.unified_diff(before, after, lineterm=""))
    assert changed[0][1].split("#")[0].rstrip() == line
