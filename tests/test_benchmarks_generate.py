"""The two benchmarks against transformers' `generate` (benchmarks/eval_vs_generate.py,
benchmarks/sample_vs_generate.py) on the tiny profile: both paths agree, the report has its
fields, and a baseline that decodes differently makes the run fail with a clear message."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    """A benchmark script as a module, registered under its plain name (the scripts import each
    other and `machine` that way)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _with_small_peak(monkeypatch, name: str):
    """The benchmark module `name`, its matmul-peak measurement shrunk to test size."""
    module = _module(name)
    machine = _module("machine")
    monkeypatch.setattr(module, "matmul_peak", lambda device: machine.matmul_peak(device, size=128, repeats=1))
    return module


@pytest.fixture
def evg(monkeypatch):
    return _with_small_peak(monkeypatch, "eval_vs_generate")


@pytest.fixture
def svg(monkeypatch):
    return _with_small_peak(monkeypatch, "sample_vs_generate")


PATH_FIELDS = ("seconds", "flops", "achieved_flop_per_second", "fraction_of_measured_peak")


def test_eval_vs_generate_identical_on_tiny(evg, tmp_path):
    out = tmp_path / "eval_vs_generate.json"
    report = evg.run(model="tiny", questions=5, threads=1, device="cpu", out=out)
    assert report["identical_predictions"] is True
    assert report["questions"] == 5 and report["model"] == "tiny"
    for path in ("batched", "generate"):
        assert all(k in report[path] for k in (*PATH_FIELDS, "questions_per_second", "flops_per_question"))
        assert report[path]["flops"] > 0
    assert report["speedup"] > 0 and "meets_target" in report
    assert json.loads(out.read_text())["runs"]["tiny/cpu"]["questions"] == 5


def test_eval_vs_generate_fails_on_a_different_baseline(evg, tmp_path, monkeypatch):
    real = evg.generate_answers
    monkeypatch.setattr(evg, "generate_answers",
                        lambda vlm, rows, max_new_tokens: real(vlm, rows, evg.MaxNewTokens(closed=1, open=1)))
    with pytest.raises(evg.PredictionMismatch, match=r"predictions differ on question \d+ .*generate"):
        evg.run(model="tiny", questions=4, threads=1, device="cpu", out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_sample_vs_generate_identical_on_tiny(svg, tmp_path):
    out = tmp_path / "sample_vs_generate.json"
    report = svg.run(model="tiny", entries=3, batch_size=2, threads=1, device="cpu", out=out)
    assert report["identical_continuations"] is True
    assert report["decode_calls"] == 2 and report["candidates"] > 0 and report["generated_tokens"] > 0
    for path in ("two_view_decode", "generate"):
        assert all(k in report[path] for k in (*PATH_FIELDS, "tokens_per_second", "flops_per_token"))
    assert report["generate"]["logits_processor"].startswith("DroppedViewPicks")
    assert "guidance_scale" in report["generate"]["why_not_classifier_free_guidance"]
    assert json.loads(out.read_text())["runs"]["tiny/cpu"]["entries"] == 3


def test_sample_vs_generate_fails_on_a_different_baseline(svg, tmp_path, monkeypatch):
    real = svg.generate_two_view

    def shorter(vlm, images, questions, prefixes, seeds, mask_ratio, max_new_tokens, strategy, *, contexts):
        return real(vlm, images, questions, prefixes, seeds, mask_ratio, 1, strategy, contexts=contexts)

    monkeypatch.setattr(svg, "generate_two_view", shorter)
    with pytest.raises(svg.ContinuationMismatch, match=r"continuations differ at decode call \d+, candidate \d+ .*generate"):
        svg.run(model="tiny", entries=2, batch_size=2, threads=1, device="cpu", out=tmp_path / "x.json")


def test_sample_vs_generate_checks_logprobs(svg):
    call = {"questions": ["q"], "prefixes": [[5]]}
    svg.check_identical([call], [([[7, 4]], [-1.0])], [([[7, 4]], [-1.00005])])
    with pytest.raises(svg.ContinuationMismatch, match="full-view log-probs differ"):
        svg.check_identical([call], [([[7, 4]], [-1.0])], [([[7, 4]], [-1.001])])
