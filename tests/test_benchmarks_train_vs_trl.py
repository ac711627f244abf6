"""benchmarks/train_vs_trl.py end to end on the tiny profile: ours and TRL's DPOTrainer, one epoch each."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from benchmarks.train_vs_trl import DEFAULT_METHODS, app  # noqa: E402


def test_tiny_run_compares_ours_and_trl(tmp_path):
    out = tmp_path / "train_vs_trl.json"
    args = ["--profile", "tiny", "--entries", "3", "--batch-entries", "2", "--epochs", "2", "--device", "cpu",
            "--threads", "1", "--in-process", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())["runs"]["tiny/cpu"]

    assert set(report["results"]) == set(DEFAULT_METHODS)
    assert report["pairs_per_entry"] == {"ours_mlpo": 6, "ours_dpo": 3, "trl_dpo": 3, "trl_dpo_mlpo_pairs": 6}
    for method, r in report["results"].items():
        assert r["pairs_per_entry"] == report["pairs_per_entry"][method]
        assert r["optimizer_steps"] == 2  # ceil(3 / 2): the same steps for ours and TRL
        for key in ("entries_per_second", "pairs_per_second", "seconds_per_epoch", "step_flops_first_batch",
                    "rss_after_model_load_mib", "utilization"):
            assert r[key] is not None, (method, key)
        assert r["step_flops_first_batch"] > 0
    assert report["results"]["trl_dpo"]["dataset_rows"] == 9
    assert report["results"]["trl_dpo_mlpo_pairs"]["dataset_rows"] == 18
    assert report["results"]["trl_dpo"]["tokens_match_ours"] is True
    ours = report["results"]["ours_mlpo"]
    assert ours["seconds_per_epoch"] == pytest.approx(
        ours["seconds_epoch_loop"] + (ours["seconds_tokenize"] + ours["seconds_reference_pass"]) / 2)

    # Step 0, same first batch, same drawn adapter (A and B), policy != reference: TRL's DPO loss and
    # ours agree only if both score the same tokens the same way; neither is the trivial log 2.
    check = report["first_step_loss_check"]
    assert abs(check["ours_dpo_first_step_loss"] - math.log(2)) > 1e-3
    assert check["ours_dpo_first_step_loss"] == pytest.approx(check["trl_dpo_first_step_loss"], abs=1e-4)
    assert check["agree"] is True
    # MLPO sums an entry's 6 pair terms; TRL on the 6 ranked pairs averages them.
    assert check["ours_mlpo_first_step_loss"] == pytest.approx(check["trl_mlpo_pairs_first_step_loss_times_pairs"],
                                                             abs=1e-3)
    assert check["mlpo_agree"] is True

    assert {"dpo_j3", "mlpo_vs_trl_all_ranked_pairs"} <= set(report["speedup_vs_trl"])
    assert "peak_memory_ratio" in report and "targets" in report
    assert len(report["trl_cannot"]) >= 4
    assert report["matmul_peak"]["flop_per_second"] > 0


def test_trl_prompts_that_differ_from_ours_stop_the_benchmark(tmp_path, monkeypatch):
    """The token check is live: a TRL prompt that is not ours (here the image after the question)
    must not be timed."""
    import benchmarks.train_vs_trl as bench

    def image_last(vlm, question, context):
        messages = [{"role": "user", "content": question.strip() + "\n" + bench.IMAGE_TOKEN}]
        return vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    monkeypatch.setattr(bench, "trl_prompt", image_last)
    with pytest.raises(AssertionError, match="TRL prompt tokens differ from ours for row 0"):
        bench.measure("tiny", 2, 3, 2, 1, "cpu", 1, ["trl_dpo"], in_process=True)
