"""Batches shared out over processes (`pipeline.sharding`, `run_batches(shard=...)`): each process
computes the batches `index % world_size == rank`, the main process gathers every part in batch
order, and the artifact is the one a single process writes.

In process: two ranks simulated by two threads that share a real barrier. In subprocesses:
`accelerate launch --num_processes 2 --cpu` of the `sample` and `evaluate` stages with the
command lines dvc.yaml gives them, against a plain one-process run, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.data import phantom_reports
from pipeline.evaluation import EvaluateConfig, evaluate_models
from pipeline.params import project_config
from pipeline.resume import BatchStore, run_batches
from pipeline.sharding import Shard, current_shard
from tests.conftest import stage_commands

REPO = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("y", pa.int64())])


def squares(calls: list, delay: float = 0.0):
    def compute(batch: list[int]) -> list[dict]:
        time.sleep(delay)
        calls.append(batch[0])
        return [{"x": x, "y": x * x} for x in batch]

    return compute


def run_ranks(world: int, job) -> list:
    """`job(shard)` for every rank of `world`, each in its own thread, sharing one real barrier."""
    barrier = threading.Barrier(world, timeout=60)
    results: list = [None] * world
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = job(Shard(rank=rank, world_size=world, wait=barrier.wait))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ----- rank / batch assignment ---------------------------------------------------------------------


def test_every_batch_belongs_to_exactly_one_rank():
    for world in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 12):
            shards = [Shard(rank=r, world_size=world) for r in range(world)]
            owned = sorted(i for s in shards for i in s.indices(n))
            assert owned == list(range(n))
            for s in shards:
                assert list(s.indices(n)) == [i for i in range(n) if s.owns(i)]
    assert list(Shard(rank=1, world_size=3).indices(8)) == [1, 4, 7]
    assert Shard().is_main and not Shard(rank=1, world_size=2).is_main
    with pytest.raises(ValueError):
        Shard(rank=2, world_size=2)


def test_a_single_process_is_the_unsharded_run():
    shard = current_shard()  # no launcher in the test process
    assert (shard.rank, shard.world_size, shard.device, shard.is_main) == (0, 1, None, True)


def test_processes_that_accelerate_does_not_see_fail_loudly(monkeypatch):
    # torchrun (or accelerate launch --multi_gpu) of CPU processes without ACCELERATE_USE_CPU=1: each
    # process would be alone, do all the work and clear the others' parts
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(RuntimeError, match="2 processes were launched but accelerate sees 1"):
        current_shard()


# ----- the ordered gather --------------------------------------------------------------------------


def test_two_ranks_compute_disjoint_batches_and_the_main_one_gathers_in_batch_order(tmp_path):
    items = list(range(11))
    one = run_batches(items, 2, squares([]), BatchStore(tmp_path / "one", "k", SCHEMA), desc="t")

    calls: list[list[int]] = [[], []]

    def job(shard: Shard):
        # rank 0 is the slower one: rank 1's parts land first, and the gather still follows batch order
        compute = squares(calls[shard.rank], delay=0.02 if shard.is_main else 0.0)
        return run_batches(items, 2, compute, BatchStore(tmp_path / "two", "k", SCHEMA), desc="t", shard=shard)

    main, other = run_ranks(2, job)
    assert calls == [[0, 4, 8], [2, 6, 10]]  # batch i (first item 2i) on rank i % 2
    assert main.table.equals(one.table) and main.table.column("x").to_pylist() == items
    assert other.table is None  # the other rank reads nothing back
    assert (main.batches, main.reused, main.computed) == (6, 0, 6)
    assert (other.batches, other.computed) == (6, 3)
    assert not (tmp_path / "two" / "k").exists()  # cleared by the main rank once the table is read


def test_sharded_runs_resume_from_parts_written_with_any_process_count(tmp_path):
    items = list(range(10))
    one = run_batches(items, 2, squares([]), BatchStore(tmp_path / "one", "k", SCHEMA), desc="t")

    # A one-process run interrupted after 3 batches ...
    store = BatchStore(tmp_path / "w", "k", SCHEMA)
    store.open()
    for i in range(3):
        store.write(i, [{"x": x, "y": x * x} for x in items[2 * i:2 * i + 2]])
    (tmp_path / "w" / "stale").mkdir()  # another key's parts: pruned by the main rank
    # ... resumed with 2: only the missing batches are computed, each on its rank
    calls: list[list[int]] = [[], []]
    main, _ = run_ranks(2, lambda shard: run_batches(items, 2, squares(calls[shard.rank]),
                                                     BatchStore(tmp_path / "w", "k", SCHEMA), desc="t",
                                                     shard=shard, clear=False))
    assert calls == [[8], [6]]  # batches 4 (rank 0) and 3 (rank 1)
    assert (main.reused, main.computed) == (3, 2)
    assert main.table.equals(one.table)
    assert not (tmp_path / "w" / "stale").exists()

    # and parts written by 2 processes are read back by 1 without computing anything
    calls1: list[int] = []
    again = run_batches(items, 2, squares(calls1), BatchStore(tmp_path / "w", "k", SCHEMA), desc="t")
    assert calls1 == [] and again.reused == 5 and again.table.equals(one.table)


def test_evaluate_models_sharded_equals_one_process(tmp_path, tiny_vlm, rows):
    reports = phantom_reports.generate_reports(5, 3, 32)
    cfg = project_config(EvaluateConfig, "evaluate", batch_size=3, max_new_tokens={"closed": 3, "open": 3},
                         report_max_new_tokens=4, max_rows=None)
    models = [("sft", "models/sft")]
    inputs = {"input": "t", "reports": "r", "models": {"sft": "a"}}
    one = evaluate_models(lambda folder: tiny_vlm, models, rows, cfg, tmp_path / "one", inputs, report_rows=reports)
    seen: list[list[str]] = [[], []]

    def job(shard: Shard):
        return evaluate_models(lambda folder: tiny_vlm, models, rows, cfg, tmp_path / "two", inputs,
                               on_model=lambda name, metrics: seen[shard.rank].append(name),
                               report_rows=reports, shard=shard)

    main, other = run_ranks(2, job)
    assert main.report == one.report and main.predictions == one.predictions
    assert main.report_predictions == one.report_predictions
    assert main.work["sft"]["predictions"] == {"batches": 6, "reused": 0, "computed": 6}
    assert other.report == {} and other.predictions == {} and other.report_predictions == {}
    assert seen == [["sft"], []]  # scoring and progress on the main process only


# ----- real processes: accelerate launch -----------------------------------------------------------


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, root: Path, processes: int) -> str:
    """The stage with dvc.yaml's arguments in `root`: plain `python -m` for 1 process, else
    `accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=1 (accelerate's own
    `--cpu` starts one process unless it goes through mpirun; this is torchrun underneath)."""
    module = f"pipeline.stages.{stage.split('@')[0]}"
    args = stage_commands()[stage]
    env = dict(ENV)
    if processes == 1:
        argv = [sys.executable, "-m", module, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", module, *args]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def outputs(root: Path, stage: str, flags: tuple[str, ...]) -> dict[str, bytes]:
    args = stage_commands()[stage]
    files = {}
    for flag in flags:
        out = root / args[args.index(flag) + 1]
        for file in sorted([out] if out.is_file() else out.rglob("*")):
            files[str(file.relative_to(root))] = file.read_bytes()
    return files


def assert_same_outputs(one: dict[str, bytes], two: dict[str, bytes]) -> None:
    assert one and sorted(two) == sorted(one)
    for name, data in one.items():
        assert two[name] == data, f"{name}: 2 processes wrote other bytes than 1"


def test_sample_with_two_processes_writes_the_bytes_of_one(tmp_path):
    from tests.test_resume_kill import _workspace

    one = _workspace(tmp_path / "one")  # 24 pool entries, sample.batch_size 2: 12 batches
    two = tmp_path / "two"
    shutil.copytree(one, two)
    launch("sample", one, 1)
    assert "(process 0 of 2)" in launch("sample", two, 2)  # really two processes, sharing the batches
    flags = ("--output", "--metrics")
    assert_same_outputs(outputs(one, "sample", flags), outputs(two, "sample", flags))
    work = stage_commands()["sample"][stage_commands()["sample"].index("--work-dir") + 1]
    assert not (two / work).exists() or not any((two / work).iterdir())  # cleared by the main process


def test_evaluate_with_two_processes_writes_the_bytes_of_one(tmp_path):
    from tests.test_resume_evaluate import ARGS, make_workspace

    one, two = tmp_path / "one", tmp_path / "two"
    # 24 test rows in batches of 2 per pass; no report rows (METEOR's Java costs seconds a run: the
    # report passes are sharded by the same run_batches, checked in process above)
    make_workspace(one)
    shutil.copytree(one, two)
    launch("evaluate@aligned", one, 1)
    out = launch("evaluate@aligned", two, 2)
    assert "evaluate aligned (process 0 of 2)" in out
    assert out.count("evaluate aligned: closed") == 1  # progress printed by the main process only
    flags = ("--output", "--log-samples", "--report-output", "--metrics")
    assert_same_outputs(outputs(one, "evaluate@aligned", flags), outputs(two, "evaluate@aligned", flags))
    work = two / ARGS[ARGS.index("--work-dir") + 1]
    assert not work.exists()
