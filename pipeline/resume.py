"""Resumable batched work: finished batches are kept on disk under a content key.

A long loop over batches (sampling candidates, later evaluation) writes each finished batch as
a Parquet part under `work_dir/<key>/` the moment it is done. `key` is a
`pipeline.fingerprint.fingerprint` of everything that determines the output: the inputs' bytes,
the config and the code version. A restarted run with the same key skips the finished parts; any
change gives a new key, and parts kept under other keys are removed, never reused.

Work made of several pieces (`evaluate`: each model's predictions, blind predictions and
log-prob gaps) keeps one key per piece under the same root: each store names the other keys of
the run (`siblings`) so that opening one does not delete the others, and the parts stay
(`run_batches(clear=False)`) until the whole stage has written its outputs and calls `clear_all`.

Under `accelerate launch --num_processes N` a loop's batches are shared out (`run_batches(shard=...)`,
`pipeline.sharding`): each process computes its own batches as parts, and the main process reads
all of them back in batch order, the table one process would have assembled.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.schema import write_table
from pipeline.sharding import Shard


@dataclass
class BatchRun:
    """The concatenated output and how much of it was reused from an earlier, interrupted run."""

    table: pa.Table | None  # None on a process other than the main one (`pipeline.sharding`)
    batches: int
    reused: int  # batches read back from disk
    computed: int  # batches computed by this run: by all its processes (main), by this one (others)


class BatchStore:
    """The finished parts of one piece of work, `root/<key>/part-00000.parquet`, ..."""

    def __init__(self, root: str | Path, key: str, schema: pa.Schema, siblings: Collection[str] = ()) -> None:
        self.root = Path(root)
        self.key = key
        self.schema = schema
        self.siblings = frozenset(siblings)  # other keys of the same run: kept by `open`
        self.folder = self.root / key

    def part(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.parquet"

    def open(self) -> None:
        """Create this key's folder and delete the parts of every key but it and its siblings
        (they can never match)."""
        prune(self.root, {self.key, *self.siblings})
        self.folder.mkdir(parents=True, exist_ok=True)

    def finished(self, n_batches: int) -> int:
        """How many of the first `n_batches` parts are on disk."""
        return sum(1 for i in range(n_batches) if self.done(i))

    def done(self, index: int) -> bool:
        return self.part(index).is_file()

    def write(self, index: int, rows: list[dict]) -> None:
        # write_table writes to a temporary name and renames: a kill never leaves half a part.
        write_table(pa.Table.from_pylist(rows, schema=self.schema), self.part(index), self.schema)

    def read(self, n_batches: int) -> pa.Table:
        return pa.concat_tables([pq.read_table(self.part(i)).cast(self.schema) for i in range(n_batches)])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def prune(root: str | Path, keep: Collection[str]) -> None:
    """Delete everything under `root` but the entries named in `keep`."""
    root = Path(root)
    if root.exists():
        for stale in root.iterdir():
            if stale.name not in keep:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def clear_all(root: str | Path) -> None:
    """Delete every part under `root`: call it once everything they were kept for is written."""
    shutil.rmtree(root, ignore_errors=True)


def run_batches(
    items: Sequence[Any],
    batch_size: int,
    compute: Callable[[list[Any]], list[dict]],
    store: BatchStore,
    desc: str,
    clear: bool = True,
    shard: Shard | None = None,
) -> BatchRun:
    """Apply `compute` to consecutive batches of `items`, resuming from `store`.

    The parts are deleted once the whole table is assembled; with `clear=False` they stay (for a
    caller that clears them once its own outputs are written).

    With a `shard` of several processes (`pipeline.sharding.current_shard()`; every process calls
    this with the same arguments), the main process first opens the store (stale keys pruned) and
    counts the finished parts, then each process computes only the unfinished batches it owns
    (`index % world_size == rank`); once every process is done, the main process reads all parts
    in batch order and returns the table, and the others return `table=None` and touch nothing.
    Without one (or with one process) this is the plain single-process loop.
    """
    shard = shard or Shard()
    n_batches = (len(items) + batch_size - 1) // batch_size
    reused = 0
    if shard.is_main:
        store.open()
        reused = store.finished(n_batches)
        if reused:
            tqdm.write(f"{desc}: resuming, {reused}/{n_batches} batches already done ({store.folder})")
    shard.wait()  # no process writes a part before the main one has pruned and counted
    store.folder.mkdir(parents=True, exist_ok=True)
    mine = shard.indices(n_batches)
    computed = 0
    if shard.world_size > 1:
        desc = f"{desc} (process 0 of {shard.world_size})"
    with tqdm(total=len(mine), initial=sum(1 for i in mine if store.done(i)), desc=desc, unit="batch",
              disable=not shard.is_main) as bar:
        for i in mine:
            if store.done(i):
                continue
            store.write(i, compute(list(items[i * batch_size:(i + 1) * batch_size])))
            computed += 1
            bar.update(1)
    shard.wait()  # every part is on disk
    if not shard.is_main:
        return BatchRun(table=None, batches=n_batches, reused=reused, computed=computed)
    table = store.read(n_batches) if n_batches else store.schema.empty_table()
    if clear:
        store.clear()
    # Every batch not on disk at the start was computed by exactly one process.
    return BatchRun(table=table, batches=n_batches, reused=reused, computed=n_batches - reused)
