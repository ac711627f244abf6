"""`gradient_checkpointing` in both trainers: the same training, recomputed activations; the model
is left without checkpointing afterwards; and its clash with a shared prompt cache is refused."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ParamsError
from pipeline.training.preference import PreferenceTrainer, lora_parameters
from pipeline.training.sft import train_sft
from tests.conftest import make_rows
from tests.test_preference import config, scored_rows, tiny
from tests.test_resume_training import _fresh_tiny, _sft_config


def test_sft_with_gradient_checkpointing_trains_the_same_weights():
    rows = make_rows(16)
    results = {}
    for on in (False, True):
        vlm = _fresh_tiny(rows)
        flags: list[bool] = []
        for layer in vlm.language_model.layers:
            layer.register_forward_hook(lambda m, *_, f=flags: f.append(m.gradient_checkpointing and m.training))
        summary, _ = train_sft(vlm, rows, _sft_config(vision_epochs=0, epochs=1, checkpoint_every=None,
                                                      gradient_checkpointing=on), fresh=True)
        assert not vlm.model.is_activation_checkpointing  # off again once trained
        results[on] = ({k: v.clone() for k, v in vlm.model.state_dict().items()}, summary, flags)
    (plain, plain_summary, plain_flags), (ckpt, ckpt_summary, ckpt_flags) = results[False], results[True]
    # every decoder layer of every training step ran checkpointed (its activations recomputed in backward)
    assert ckpt_flags and all(ckpt_flags) and not any(plain_flags)
    assert ckpt_summary["sft_first_loss"] == pytest.approx(plain_summary["sft_first_loss"], abs=1e-6)
    for name, value in plain.items():
        torch.testing.assert_close(ckpt[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_preference_training_with_gradient_checkpointing_trains_the_same_adapter():
    adapters, flags = {}, {}
    for on in (False, True):
        vlm = tiny()
        trainer = PreferenceTrainer(vlm, scored_rows(8), config(share_prompt=False, gradient_checkpointing=on))
        trainer.compute_reference()
        flags[on] = []
        for layer in vlm.model.model.language_model.base_model.model.layers:
            layer.register_forward_hook(lambda m, *_, f=flags[on]: f.append(m.gradient_checkpointing and m.training))
        trainer.train()
        assert not vlm.model.is_activation_checkpointing
        adapters[on] = {n: p.detach().clone() for n, p in lora_parameters(vlm).items()}
    assert flags[True] and all(flags[True]) and not any(flags[False])
    for name, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert any(float(v.abs().sum()) > 0 for n, v in adapters[True].items() if "lora_B" in n)


def test_gradient_checkpointing_with_a_shared_prompt_cache_is_refused():
    with pytest.raises(ParamsError, match="share_prompt: false"):
        config(share_prompt=True, gradient_checkpointing=True)


@pytest.mark.parametrize("kind, stage, refused", [("FSDP", None, "FSDP"), ("DEEPSPEED", 3, "ZeRO-3"),
                                                  ("DEEPSPEED", 2, None), ("MULTI_GPU", None, None), ("NO", None, None)])
def test_launch_modes_that_shard_parameters_are_refused(kind, stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline.training.common import check_whole_parameters

    accelerator = SimpleNamespace(distributed_type=DistributedType[kind],
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    if refused is None:
        check_whole_parameters(accelerator)
    else:
        with pytest.raises(NotImplementedError, match=f"{refused} shards the parameters"):
            check_whole_parameters(accelerator)
