"""Resumable training: accelerate's own checkpointing, keyed by content, kept under `data/work/`.

Both trainers (`sft`, `train`) save their whole state every `checkpoint_every` optimizer steps
with `Accelerator.save_state`: the optimizer, the learning-rate schedule, every RNG (Python,
NumPy, torch, CUDA) and registered objects, here the loop's position and its logged history
(`LoopState`). Model weights go through accelerate's save/load hooks, restricted to what
training changes (`TrainedWeights`: LoRA adapters, projector, tower), so a checkpoint of a 7B
LoRA run holds megabytes, not the frozen 14 GB.

A checkpoint is written to `<name>.tmp` and renamed when complete, then older ones are deleted:
a kill at any moment leaves the previous checkpoint intact, never half of one. The folder is
`work_dir/<key>/`, `key` a `pipeline.fingerprint.fingerprint` of the inputs' bytes, the config
and the code: a restart with the same key continues from the newest checkpoint; any change gives
a new key, and the checkpoints of every other key are deleted (they can never match).

Resuming reproduces an uninterrupted run exactly on the same machine and process count: the
data order is restored from the shuffling generator's state at the start of the interrupted
epoch (then the finished batches are skipped), and accelerate restores every other RNG.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import DataError
from pipeline.resume import prune

WEIGHTS_FILE = "trained_weights.safetensors"
_RNG_FILE = "random_states_0.pkl"  # accelerate's name; its absence would make load_state skip the RNGs silently


class LoopState:
    """Where a training loop stands, saved with every checkpoint (accelerate `register_for_checkpointing`).

    `values` is plain data: the phase, epoch and step counters, the shuffling generator's state
    at the start of the epoch, and the logged history (replayed into DVCLive on resume, so the
    curves of a resumed run are the uninterrupted run's).
    """

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = dict(state)


class TrainedWeights:
    """The parameters a trainer changes, by name; saved and loaded instead of the whole model."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        self.params = dict(named)

    def save(self, folder: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(folder / WEIGHTS_FILE))

    def load(self, folder: Path) -> None:
        state = load_file(str(folder / WEIGHTS_FILE))
        if set(state) != set(self.params):
            missing, extra = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
            raise DataError(
                f"{folder}: the checkpoint's weights do not match the model being trained (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); delete {folder.parent} to start over"
            )
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name].to(param.device, param.dtype))


class Delegate:
    """A checkpointed slot for an object that changes between phases (each phase's optimizer and
    schedule): accelerate registers objects once, so the slot is registered and its `target` set."""

    def __init__(self) -> None:
        self.target: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.target is None else self.target.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state)


class Checkpoints:
    """The checkpoints of one training run under `root/<key>/checkpoint-<step>`.

    `root` None switches checkpointing off (library use, tests that don't resume).
    """

    def __init__(self, accelerator, root: str | Path | None, key: str, every: int | None,
                 weights: TrainedWeights, state: LoopState, desc: str) -> None:
        self.accelerator = accelerator
        self.folder = Path(root) / key if root is not None else None
        self.every = every
        self.weights = weights
        self.state = state
        self.desc = desc
        self.saved = 0
        accelerator.register_for_checkpointing(state)
        # Model weights: only the trained ones (accelerate's documented hook for adapters).
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        if self.folder is not None and accelerator.is_main_process:
            prune(root, {key})
            self.folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # not the full state dicts (frozen weights are the input model's)
        if self.accelerator.is_main_process:
            self.weights.save(Path(output_dir))

    def _load_hook(self, models: list, input_dir: str) -> None:
        models.clear()
        self.weights.load(Path(input_dir))

    def _engine_kwargs(self, load: bool) -> dict[str, Any]:
        """Under DeepSpeed accelerate saves the engine's own checkpoint (every parameter, the frozen
        ones too, and each process's part of the ZeRO optimizer state), not what the hooks give it:
        leave the frozen weights out (the input model's; the hook saves the trained ones)."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return {}
        return {"load_module_strict": False} if load else {"exclude_frozen_parameters": True}

    def latest(self) -> Path | None:
        """The newest complete checkpoint (names sort by phase tag, then step)."""
        if self.folder is None or not self.folder.exists():
            return None
        done = sorted(p for p in self.folder.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def latest_tag(self) -> str | None:
        """The phase tag of the newest checkpoint (`save(step, tag)`), None if there is none."""
        latest = self.latest()
        return None if latest is None else latest.name[len("checkpoint-"):].rsplit("-", 1)[0]

    def restore(self, tag: str = "step") -> bool:
        """Load the newest checkpoint if it has `tag`: weights, optimizer, schedule, RNGs and `state`."""
        latest = self.latest()
        if latest is None or self.latest_tag() != tag:
            return False
        if not (latest / _RNG_FILE).is_file() or not (latest / WEIGHTS_FILE).is_file():
            raise DataError(f"{latest}: incomplete checkpoint (no {_RNG_FILE} or {WEIGHTS_FILE}); delete it")
        self.accelerator.load_state(str(latest), **self._engine_kwargs(load=True))
        if self.accelerator.is_main_process:
            tqdm.write(f"{self.desc}: resuming from {latest} ({self.state.values.get('where', '?')})")
        return True

    def due(self, step: int) -> bool:
        return self.folder is not None and self.every is not None and step > 0 and step % self.every == 0

    def save(self, step: int, tag: str = "step") -> None:
        """Checkpoint after optimizer step `step` of phase `tag` (tags sort in phase order); keeps only
        the newest."""
        assert self.folder is not None
        final = self.folder / f"checkpoint-{tag}-{step:09d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), **self._engine_kwargs(load=False))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.folder.glob("checkpoint-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.saved += 1
        self.accelerator.wait_for_everyone()

    def clear(self) -> None:
        """Delete this run's checkpoints (after its output is saved)."""
        if self.folder is not None and self.accelerator.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)
