"""Preference training on the tiny profile: grouped scoring, the kept reference, the loop, saving."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.batching import answer_logprobs, collate_sequences
from pipeline.errors import ParamsError
from pipeline.models.profiles import build_tiny, load_vlm
from pipeline.params import load_params, project_config, project_params_path
from pipeline.schema import SCORED_SCHEMA, write_rows
from pipeline.training.preference import (
    EntryCollator,
    GroupedScorer,
    PreferenceConfig,
    PreferenceTrainer,
    build_entries,
    lora_parameters,
)
from tests.conftest import make_rows

WORDS = ["yes", "no", "left", "right", "large", "small", "1", "2", "3", "lesion"]
# Dispreferred answers in rank order (most similar to the chosen answer first).
ALTERNATIVES = {"yes": ["no", "left lesion", "small"], "no": ["yes", "right", "large lesion"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model's tensors are small: on a shared two-core machine, handing each op to two
    # threads costs more than the op (measured: 5-15x slower tests).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scored_rows(n: int = 8, weight: float | None = None) -> list[dict]:
    """SCORED_SCHEMA-like rows; odd rows have only two dispreferred answers (ragged J)."""
    rows = make_rows(n)
    for i, row in enumerate(rows):
        texts = ALTERNATIVES[row["answer"]][: 3 - (i % 2)]
        row["rejected"] = [
            {"text": t, "similarity": 0.9 - 0.2 * j, "level": j + 1, "logprob": -1.0} for j, t in enumerate(texts)
        ]
        row["judgements"] = [
            {"score": 3.0, "rounds": 1, "agreed": True, "transcript": "[]",
             "weight": weight if weight is not None else 0.8 + 0.1 * j + 0.05 * (i % 3)}
            for j in range(len(texts))
        ]
    return rows


def tiny(seed: int = 0):
    rows = make_rows(4)
    return build_tiny([r["question"] for r in rows] + WORDS, seed=seed)


def config(**overrides) -> PreferenceConfig:
    values = dict(batch_size=4, epochs=2, lr=5e-3, warmup_fraction=0.0, evaluate_after=False)
    values.update(overrides)
    return project_config(PreferenceConfig, "train", **values)


def perturb_adapter(vlm, seed: int = 1) -> None:
    """LoRA B starts at zero, where policy == reference; give the adapter an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(vlm).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ----- configuration and entries ------------------------------------------------------------------


def test_both_parts_off_is_a_clear_error():
    with pytest.raises(ParamsError, match="explicit and implicit both false"):
        config(loss="mlpo", explicit=False, implicit=False)
    with pytest.raises(ParamsError, match="`train.loss` must be 'dpo' or 'mlpo'"):
        config(loss="ipo")
    with pytest.raises(ParamsError, match="unknown key `train.learning_rate`"):
        config(learning_rate=1e-4)


def test_entries_take_rank_order_and_judge_weights():
    vlm = tiny()
    rows = scored_rows(4)
    mlpo = build_entries(vlm, rows, config(max_rejected=2))
    assert [len(e.rejected) for e in mlpo] == [2, 2, 2, 2]
    assert mlpo[0].rejected[0] == vlm.answer_ids(rows[0]["rejected"][0]["text"])
    assert mlpo[0].weights == [rows[0]["judgements"][j]["weight"] for j in range(2)]
    # train.dispreferred: textual (tests/test_visual_training.py has the others): all on the entry image, all ranked
    assert all(e.rejected_images == [None, None] and e.ranked == [True, True] for e in mlpo)
    dpo = build_entries(vlm, rows, config(loss="dpo"))
    assert all(len(e.rejected) == 1 for e in dpo)  # the top-ranked dispreferred only
    assert dpo[2].rejected[0] == vlm.answer_ids(rows[2]["rejected"][0]["text"])
    assert dpo[2].weights == [rows[2]["judgements"][0]["weight"]]
    assert build_entries(vlm, rows, config(weighted=False))[0].weights == [1.0, 1.0, 1.0]


def test_entry_prompts_follow_their_context():
    vlm = tiny()
    rows = scored_rows(2)
    rows[1]["context"] = [{"question": rows[0]["question"], "answer": "yes"}]
    entries = build_entries(vlm, rows, config())
    assert entries[0].prompt == vlm.prompt_ids(rows[0]["question"])
    assert entries[1].prompt == vlm.prompt_ids(rows[1]["question"], rows[1]["context"]) != entries[0].prompt


def test_missing_weight_is_an_error_when_weighted():
    vlm = tiny()
    rows = scored_rows(2)
    rows[1]["judgements"][0]["weight"] = None
    with pytest.raises(ValueError, match="no judge weight"):
        build_entries(vlm, rows, config(weighted=True))
    build_entries(vlm, rows, config(weighted=False))  # weights are not read


# ----- grouped scoring ----------------------------------------------------------------------------


@pytest.mark.parametrize("share_prompt", [True, False])
def test_grouped_logprobs_equal_scoring_each_sequence_alone(share_prompt):
    vlm = tiny()
    rows = scored_rows(6)
    trainer = PreferenceTrainer(vlm, rows, config(share_prompt=share_prompt))
    perturb_adapter(vlm)
    table = trainer.score()
    assert table.shape == (6, 4)

    separate = torch.zeros_like(table)
    with torch.no_grad():
        for i, row in enumerate(rows):
            answers = [row["answer"]] + [r["text"] for r in row["rejected"]]
            for k, answer in enumerate(answers):
                batch = collate_sequences(vlm, [row["image"]], [row["question"]], [answer], contexts=[row["context"]])
                logits = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
                separate[i, k] = answer_logprobs(logits, batch.labels)[0]
    torch.testing.assert_close(table, separate, atol=1e-4, rtol=1e-5)
    assert (table[1::2, 3] == 0).all()  # ragged entries: the missing slot is empty


def test_vision_tower_runs_once_per_entry():
    vlm = tiny()
    trainer = PreferenceTrainer(vlm, scored_rows(4), config())
    batch = trainer.collator([0, 1, 2, 3])
    seen: list[int] = []
    hook = vlm.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        GroupedScorer(vlm, share_prompt=True)(batch)
    finally:
        hook.remove()
    assert seen == [4]  # 4 images for 4 entries, not one per scored sequence
    assert batch["answer_ids"].shape[0] == 4 + 3 + 2 + 3 + 2  # 1 + J rows per entry, in one batch


# ----- training -----------------------------------------------------------------------------------


def test_reference_logprobs_never_change_during_training():
    vlm = tiny()
    trainer = PreferenceTrainer(vlm, scored_rows(8), config())
    snapshot = trainer.compute_reference().clone()
    trainer.train()
    assert torch.equal(trainer.reference, snapshot)  # the kept table is never rewritten
    # and it still equals the SFT model, i.e. the trained model with its adapter disabled
    torch.testing.assert_close(trainer.score(adapter=False), snapshot, atol=1e-5, rtol=0)
    assert not torch.allclose(trainer.score(adapter=True), snapshot, atol=1e-3)


def assert_only_lora_trained(vlm, frozen_before: dict, lora_before: dict) -> None:
    """The LoRA adapters changed, and the SFT weights under them are untouched."""
    assert any(not torch.equal(lora_before[n], p) for n, p in lora_parameters(vlm).items())
    for name, p in vlm.model.named_parameters():
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(p, frozen_before[original]), name


def test_a_few_steps_change_lora_and_raise_the_reward_margin():
    vlm = tiny()
    frozen_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    trainer = PreferenceTrainer(vlm, scored_rows(8), config(epochs=3))
    lora_before = {n: p.detach().clone() for n, p in lora_parameters(vlm).items()}
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert_only_lora_trained(vlm, frozen_before, lora_before)
    assert abs(before["reward_margin"]) < 1e-4  # policy == reference at the start
    assert after["reward_margin"] > before["reward_margin"] + 1e-3
    assert after["loss"] < before["loss"]


def test_weights_all_one_equal_unweighted_training():
    histories = []
    for weighted in (True, False):
        trainer = PreferenceTrainer(tiny(), scored_rows(8, weight=1.0), config(weighted=weighted))
        trainer.train()
        histories.append([(h["loss"], h["explicit"], h["implicit"]) for h in trainer.history])
    assert len(histories[0]) == 4
    for a, b in zip(*histories, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_loss_switches():
    rows = scored_rows(8)
    dpo = PreferenceTrainer(tiny(), rows, config(loss="dpo", epochs=1))
    assert dpo.collator([0, 1])["answer_ids"].shape[0] == 4  # chosen + top-ranked only
    dpo.train()
    assert all(h["implicit"] == 0 and "ranking_accuracy" not in h for h in dpo.history)

    explicit_only = PreferenceTrainer(tiny(), rows, config(implicit=False, epochs=1))
    explicit_only.train()
    assert all(h["implicit"] == 0 and h["explicit"] > 0 for h in explicit_only.history)

    implicit_only = PreferenceTrainer(tiny(), rows, config(explicit=False, epochs=1))
    implicit_only.train()
    assert all(h["explicit"] == 0 and h["implicit"] > 0 for h in implicit_only.history)
    assert all("ranking_accuracy" in h for h in implicit_only.history)


def test_nll_term_is_logged_and_keeps_the_chosen_answer_likely():
    rows = scored_rows(8)
    plain = PreferenceTrainer(tiny(), rows, config(epochs=3, nll_weight=0.0))
    plain.train()
    anchored = PreferenceTrainer(tiny(), rows, config(epochs=3, nll_weight=1.0))
    anchored.train()
    assert all("nll" not in h for h in plain.history)
    assert all(h["nll"] > 0 for h in anchored.history)
    assert anchored.history[-1]["nll"] < anchored.history[0]["nll"]
    # the chosen answers end up more likely with the anchor than without it
    assert anchored.score()[:, 0].mean() > plain.score()[:, 0].mean()
    with pytest.raises(ParamsError, match="nll_weight"):
        config(nll_weight=-0.5)


def test_gradient_accumulation_counts_optimizer_steps():
    trainer = PreferenceTrainer(tiny(), scored_rows(8), config(batch_size=2, grad_accum=2, epochs=1))
    summary = trainer.train()
    assert summary["optimizer_steps"] == 2  # 4 micro-batches, 2 per step


# ----- saving and the stage -----------------------------------------------------------------------


def test_saved_merged_model_and_adapter_reproduce_the_policy(tmp_path):
    from peft import PeftModel

    vlm = tiny()
    rows = scored_rows(6)
    trainer = PreferenceTrainer(vlm, rows, config())
    trainer.compute_reference()
    perturb_adapter(vlm)
    policy = trainer.score()
    reference = trainer.reference.clone()
    trainer.save(tmp_path / "aligned")

    cfg = config(weighted=False)
    merged = load_vlm(tmp_path / "aligned", device="cpu", dtype=torch.float32)
    scorer = GroupedScorer(merged, share_prompt=True).eval()
    collate = EntryCollator(merged, build_entries(merged, rows, cfg), 3)
    with torch.no_grad():
        torch.testing.assert_close(scorer(collate(list(range(6)))), policy, atol=1e-4, rtol=1e-5)

    base = tiny()  # the SFT model again (same seed), plus the saved adapter
    base.language_model = PeftModel.from_pretrained(base.language_model, tmp_path / "aligned" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(GroupedScorer(base, share_prompt=True).eval()(collate(list(range(6)))), policy,
                                   atol=1e-4, rtol=1e-5)
        with base.language_model.disable_adapter():
            torch.testing.assert_close(GroupedScorer(base, share_prompt=True).eval()(collate(list(range(6)))), reference,
                                       atol=1e-4, rtol=1e-5)


def test_stage_writes_model_adapter_metrics_and_live(tmp_path):
    from pipeline.stages.train import app

    tiny().save(tmp_path / "sft")
    write_rows(scored_rows(6), tmp_path / "scored.parquet", SCORED_SCHEMA)
    assert pq.read_table(tmp_path / "scored.parquet").num_rows == 6
    train = load_params(project_params_path())["train"]
    train.update(loss="mlpo", batch_size=3, epochs=1, lr=1e-3, max_rejected=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    result = CliRunner().invoke(app, [
        "--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "scored.parquet"),
        "--model", str(tmp_path / "sft"), "--output", str(tmp_path / "aligned"),
        "--metrics", str(tmp_path / "train.json"), "--live", str(tmp_path / "live"),
        "--work-dir", str(tmp_path / "work"), "--timings", str(tmp_path / "timings.json"),
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert list((tmp_path / "work").iterdir()) == []  # checkpoints and reference removed once saved
    assert not (tmp_path / "aligned.tmp").exists()
    timings = yaml.safe_load((tmp_path / "timings.json").read_text())
    assert timings["train_seconds"] > 0 and timings["resumed_from_step"] == 0
    adapter_config = yaml.safe_load((tmp_path / "aligned" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "sft")  # its real base
    # written in a fixed order (peft's set order changes per process, and with it the DVC hash)
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    assert len(adapter_config["target_modules"]) == 4
    load_vlm(tmp_path / "aligned", device="cpu")
    summary = yaml.safe_load((tmp_path / "train.json").read_text())
    assert summary["optimizer_steps"] == 2 and summary["entries"] == 6
    assert not any("seconds" in k for k in summary)  # wall-clock values only in the uncached timings
    assert "final_train_reward_margin" in summary
    logged = (tmp_path / "live" / "plots" / "metrics" / "train")
    assert {p.stem for p in logged.iterdir()} >= {"loss", "explicit", "implicit", "reward_margin",
                                                   "reward_accuracy", "ranking_accuracy"}
