"""Resumable work is keyed by content: an interrupted run reuses exactly the finished batches, and a
changed input, config or code version reuses none."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

import pipeline.self_contrast as self_contrast
from pipeline.fingerprint import code_version, file_digest, fingerprint, folder_digest
from pipeline.params import project_config
from pipeline.resume import BatchStore, run_batches
from pipeline.self_contrast import SampleConfig, sample_pool

SAMPLE_BATCH = self_contrast.sample_batch
SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("y", pa.int64())])


class Interrupt(Exception):
    pass


def squares(calls: list, fail_at: int | None = None):
    def compute(batch):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt  # the process dies here
        calls.append(batch[0])
        return [{"x": x, "y": x * x} for x in batch]

    return compute


def test_run_batches_resumes_exactly_the_unfinished_batches(tmp_path):
    items = list(range(10))
    clean = run_batches(items, 3, squares([]), BatchStore(tmp_path / "clean", "k", SCHEMA), desc="t")
    assert clean.batches == 4 and clean.computed == 4 and clean.reused == 0

    calls: list = []
    with pytest.raises(Interrupt):
        run_batches(items, 3, squares(calls, fail_at=2), BatchStore(tmp_path / "w", "k", SCHEMA), desc="t")
    assert calls == [0, 3]
    calls = []
    resumed = run_batches(items, 3, squares(calls), BatchStore(tmp_path / "w", "k", SCHEMA), desc="t")
    assert calls == [6, 9]  # only the batches not finished before the interruption
    assert resumed.reused == 2 and resumed.computed == 2
    assert resumed.table.equals(clean.table)
    assert not (tmp_path / "w" / "k").exists()  # parts are removed once the table is assembled


def test_another_key_reuses_nothing_and_removes_stale_parts(tmp_path):
    items = list(range(6))
    with pytest.raises(Interrupt):
        run_batches(items, 2, squares([], fail_at=2), BatchStore(tmp_path, "old", SCHEMA), desc="t")
    assert (tmp_path / "old").is_dir()
    calls: list = []
    run = run_batches(items, 2, squares(calls), BatchStore(tmp_path, "new", SCHEMA), desc="t")
    assert run.reused == 0 and calls == [0, 2, 4]
    assert not (tmp_path / "old").exists()


def test_digests_follow_content_not_paths_or_mtimes(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "w.bin").write_bytes(b"weights")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert folder_digest(a) == folder_digest(b)  # another folder, same content
    (b / "w.bin").write_bytes(b"weightz")
    assert folder_digest(a) != folder_digest(b)
    (a / "x.txt").write_text("x")
    assert file_digest(a / "x.txt") == file_digest(a / "x.txt")
    assert code_version(["pipeline.resume"]) != code_version(["pipeline.fingerprint"])
    assert len(code_version(["pipeline.models"])) == 64  # a package: every module in it
    assert fingerprint({"a": 1}, "x") == fingerprint({"a": 1}, "x") != fingerprint({"a": 2}, "x")


def sample_cfg(**overrides) -> SampleConfig:
    return project_config(SampleConfig, "sample", k=3, batch_size=2, **overrides)


def counted(monkeypatch, fail_at: int | None = None) -> list:
    calls: list = []
    real = SAMPLE_BATCH

    def wrapper(vlm, rows, cfg):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt
        calls.append([r["id"] for r in rows])
        return real(vlm, rows, cfg)

    monkeypatch.setattr(self_contrast, "sample_batch", wrapper)
    return calls


def test_sampling_resumes_after_an_interruption_and_never_reuses_stale_batches(tmp_path, monkeypatch, tiny_vlm,
                                                                                 rows):
    pool = [{**r, "mine_strategy": "random", "mine_score": None} for r in rows[:7]]
    inputs = {"pool": "pool-digest", "model": "model-digest"}
    cfg = sample_cfg()
    clean = sample_pool(tiny_vlm, pool, cfg, tmp_path / "clean", inputs)
    assert clean.batches == 4

    work = tmp_path / "work"
    counted(monkeypatch, fail_at=2)
    with pytest.raises(Interrupt):
        sample_pool(tiny_vlm, pool, cfg, work, inputs)
    # The workspace moves to another folder (another machine): finished batches stay valid.
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    calls = counted(monkeypatch)
    resumed = sample_pool(tiny_vlm, pool, cfg, moved, inputs)
    assert calls == [["row-0004", "row-0005"], ["row-0006"]]  # exactly the unfinished batches
    assert resumed.reused == 2 and resumed.table.equals(clean.table)

    # A changed config, input or code version reuses nothing.
    for change in ({"cfg": sample_cfg(seed=1)}, {"inputs": {**inputs, "model": "retrained"}}, {"code": True}):
        counted(monkeypatch, fail_at=1)
        with pytest.raises(Interrupt):
            sample_pool(tiny_vlm, pool, cfg, work, inputs)
        if change.get("code"):
            monkeypatch.setattr(self_contrast, "code_version", lambda modules: "edited")
        calls = counted(monkeypatch)
        run = sample_pool(tiny_vlm, pool, change.get("cfg", cfg), work, change.get("inputs", inputs))
        assert run.reused == 0 and len(calls) == 4, change
        monkeypatch.setattr(self_contrast, "code_version", code_version)
