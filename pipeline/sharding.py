"""Data-parallel batches across processes (`accelerate launch --num_processes N`).

`pipeline.resume.run_batches` takes a `Shard`: the process of rank r of N computes only the batches
whose index i has `i % N == r` (skipping the parts already on disk), every process waits for the
others (`Shard.wait`), and only the main process (rank 0) reads every part in batch order and
returns the whole table. Since each batch is computed exactly as a single process computes it and
the parts are read back in batch order, the table, and every output the stage writes from it, is
the one a single process writes. The non-main processes get `table=None` and write nothing else.

One process (a plain `python -m pipeline.stages.<stage>`) is `Shard()`: rank 0 of 1, waiting is a
no-op, the model goes where `load_vlm` puts it by default: the run is exactly the unsharded one.
The rank, the process count, the barrier and the device come from `accelerate.PartialState`
(`current_shard`); there is no process-group code here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _alone() -> None:
    """The barrier of a single process: there is nobody to wait for."""


@dataclass(frozen=True)
class Shard:
    """This process's place among `world_size` processes that share the batches of one loop."""

    rank: int = 0
    world_size: int = 1
    wait: Callable[[], None] = field(default=_alone, repr=False, compare=False)  # blocks until every process calls it
    device: Any = None  # where this process puts its model; None: `load_vlm`'s default (one process)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of {self.world_size} processes")

    @property
    def is_main(self) -> bool:
        """The process that reads the parts back and writes the stage's outputs."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether batch `index` is this process's to compute."""
        return index % self.world_size == self.rank

    def indices(self, n_batches: int) -> range:
        """This process's batches of `n_batches`, in order."""
        return range(self.rank, n_batches, self.world_size)


def current_shard() -> Shard:
    """This process's `Shard` under `accelerate launch` (or torchrun); `Shard()` for one process.

    The process state is a singleton, so the launcher's CPU flag (ACCELERATE_USE_CPU) is read here
    as an `Accelerator` would read it. Under several processes (or that flag) each process loads
    its model onto `PartialState().device` (`cuda:<local rank>` on GPUs, the CPU otherwise).

    Raises `RuntimeError` when the launcher started several processes but accelerate sees one
    (several CPU processes without ACCELERATE_USE_CPU=1): each would do all the work and write
    the same outputs and clear the same work folder under the others' feet.
    """
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    state = process_state()
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if state.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate sees {state.num_processes} (distributed type "
            f"{state.distributed_type}); on CPUs set ACCELERATE_USE_CPU=1 in the launcher's environment "
            "(docs/sampling.md § Sharding across processes)")
    if state.num_processes == 1 and not cpu:
        return Shard()  # exactly the unsharded run: load_vlm's own device choice
    return Shard(rank=state.process_index, world_size=state.num_processes, wait=state.wait_for_everyone,
                 device=state.device)


def process_state():
    """accelerate's `PartialState` of this process (a singleton: the first call decides it).

    The launcher's CPU flag (ACCELERATE_USE_CPU) is read as an `Accelerator` would read it. Under
    DeepSpeed without CUDA (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu) accelerate leaves its
    process-group backend unset, and then every process believes it is process 0 of 1, although
    DeepSpeed did start the process group (gloo, or ccl with oneccl_bindings_for_pytorch): the
    backend is named here as DeepSpeed's accelerator names it.
    """
    import os

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    kwargs = {}
    if (not cpu and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        from deepspeed.accelerator import get_accelerator

        kwargs["backend"] = get_accelerator().communication_backend_name()
    return PartialState(cpu=cpu, **kwargs)
