"""Training resumes from accelerate checkpoints to the weights of an uninterrupted run.

In process and fast: a run is interrupted by an exception raised from its logger right after a
given step (the checkpoint of an earlier step is on disk), then a new run with the same work
folder and key continues. The kill -9 versions of these runs, through the stage scripts, are in
tests/test_resume_kill.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models.profiles import build_tiny
from pipeline.params import project_config
from pipeline.training import sft as sft_module
from pipeline.training.preference import PreferenceConfig, PreferenceTrainer
from pipeline.training.sft import SFTConfig, train_sft
from tests.conftest import make_rows
from tests.test_preference import scored_rows, tiny


class Interrupt(Exception):
    pass


class Recorder:
    """A log sink that keeps every call and raises after the `stop_after`-th call of `phase`."""

    def __init__(self, phase: str | None = None, stop_after: int | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.phase, self.stop_after = phase, stop_after

    def __call__(self, phase: str, values: dict) -> None:
        self.calls.append((phase, dict(values)))
        if phase == self.phase and sum(1 for p, _ in self.calls if p == phase) == self.stop_after:
            raise Interrupt


def _sft_config(**overrides) -> SFTConfig:
    values = dict(model="tiny", vision={}, vision_epochs=2, vision_batch_size=8, epochs=2, batch_size=8,
                  language_model="lora", lm_train_rows=None, system_prompt=None, checkpoint_every=3)
    return project_config(SFTConfig, "sft", **{**values, **overrides})


def _fresh_tiny(rows):
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    return build_tiny(texts, seed=0, vision={}, system_prompt=None)


def _state(vlm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(("phase", "stop_after"), [("vision", 5), ("lm", 4)])
def test_sft_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, phase, stop_after):
    rows = make_rows(24)
    cfg = _sft_config()
    torch.manual_seed(0)
    whole = _fresh_tiny(rows)
    whole_log = Recorder()
    summary, run = train_sft(whole, rows, cfg, fresh=True, log=whole_log, work_dir=tmp_path / "a", key="k")
    assert run.resumed_from is None and run.checkpoints.saved > 0

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train_sft(_fresh_tiny(rows), rows, cfg, fresh=True, log=Recorder(phase, stop_after),
                  work_dir=tmp_path / "b", key="k")
    # Phase 1: 3 steps per epoch (24 rows / 8), checkpoints after steps 3 (epoch end) and 6 (end
    # of phase 1); phase 2: 3 steps per epoch, checkpoints every 3 steps.
    phase1_steps = phase2_steps = _count_calls(monkeypatch, sft_module, "_patch_features")
    lm_steps = _count_calls(monkeypatch, sft_module, "collate_sequences")
    resumed_log = Recorder()
    torch.manual_seed(0)
    resumed = _fresh_tiny(rows)
    summary_b, run_b = train_sft(resumed, rows, cfg, fresh=True, log=resumed_log, work_dir=tmp_path / "b", key="k")

    assert run_b.resumed_from is not None
    whole_state, resumed_state = _state(whole), _state(resumed)
    assert whole_state.keys() == resumed_state.keys()
    for name in whole_state:
        assert torch.equal(whole_state[name], resumed_state[name]), name
    assert summary_b == summary
    assert resumed_log.calls == whole_log.calls  # finished steps replayed, the rest logged as they ran
    if phase == "vision":  # stopped at step 5: resumed from step 3, so steps 4-6 ran again
        assert phase1_steps[0] == 3
        assert lm_steps[0] == 6
    else:  # stopped at phase-2 step 4: resumed from step 3, phase 1 not rerun
        assert phase2_steps[0] == 0
        assert lm_steps[0] == 3


def test_sft_without_a_work_folder_saves_nothing(tmp_path):
    rows = make_rows(8)
    cfg = _sft_config(vision_epochs=1, epochs=1)
    _, run = train_sft(_fresh_tiny(rows), rows, cfg, fresh=True)
    assert run.checkpoints.folder is None and run.checkpoints.saved == 0
    assert list(tmp_path.iterdir()) == []


def _train_config(**overrides) -> PreferenceConfig:
    values = dict(loss="mlpo", batch_size=2, epochs=2, lr=1e-3, max_rejected=3, grad_accum=1, checkpoint_every=2,
                  evaluate_after=False)
    return project_config(PreferenceConfig, "train", **{**values, **overrides})


def _adapter(vlm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" in n}


# 6 entries in batches of 2: 3 steps per epoch, 6 in all; no checkpoint after the last step.
@pytest.mark.parametrize(("every", "stop_after", "resumed_from", "saved"), [
    (2, 3, 2, 2),  # mid-epoch checkpoint (step 2 of 3)
    (2, 4, 2, 2),  # stopped right before the step-4 checkpoint
    (3, 5, 3, 1),  # the checkpoint at an epoch's end resumes at the next epoch
])
def test_preference_training_resumes_to_the_uninterrupted_adapter(tmp_path, every, stop_after, resumed_from, saved):
    rows = scored_rows(6)
    cfg = _train_config(checkpoint_every=every)
    whole_vlm = tiny()
    whole = PreferenceTrainer(whole_vlm, copy.deepcopy(rows), cfg, log=Recorder(), work_dir=tmp_path / "a", key="k")
    whole_summary = whole.train()
    assert whole.checkpoints.saved == saved

    broken = PreferenceTrainer(tiny(), copy.deepcopy(rows), cfg, log=Recorder("train", stop_after),
                               work_dir=tmp_path / "b", key="k")
    with pytest.raises(Interrupt):
        broken.train()
    assert (tmp_path / "b" / "k" / "reference.safetensors").is_file()

    log = Recorder()
    resumed_vlm = tiny()
    resumed = PreferenceTrainer(resumed_vlm, copy.deepcopy(rows), cfg, log=log, work_dir=tmp_path / "b", key="k")
    summary = resumed.train()
    assert resumed.reuse["resumed_from_step"] == resumed_from
    assert resumed.reuse["reference_batches_reused"] == 0  # the whole table was kept, no batch recomputed
    whole_adapter, resumed_adapter = _adapter(whole_vlm), _adapter(resumed_vlm)
    assert whole_adapter.keys() == resumed_adapter.keys() and whole_adapter
    for name in whole_adapter:
        assert torch.equal(whole_adapter[name], resumed_adapter[name]), name
    assert summary == whole_summary
    assert [v for _, v in log.calls] == whole.history


def test_reference_table_resumes_by_batch(tmp_path, monkeypatch):
    """A kill while the reference table is computed keeps its finished batches."""
    rows = scored_rows(6)
    cfg = _train_config()
    first = PreferenceTrainer(tiny(), copy.deepcopy(rows), cfg, work_dir=tmp_path, key="k")
    calls = [0]
    original = first.scorer.forward

    def failing(batch):
        calls[0] += 1
        if calls[0] == 3:
            raise Interrupt
        return original(batch)

    monkeypatch.setattr(first.scorer, "forward", failing)
    with pytest.raises(Interrupt):
        first.compute_reference()
    second = PreferenceTrainer(tiny(), copy.deepcopy(rows), cfg, work_dir=tmp_path, key="k")
    table = second.compute_reference()
    assert second.reuse["reference_batches_reused"] == 2  # of 3 batches of 2 entries
    plain = PreferenceTrainer(tiny(), copy.deepcopy(rows), cfg).compute_reference()
    assert torch.equal(table, plain)
