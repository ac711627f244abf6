"""End to end on the `tiny` profile: every stage script with the exact command line dvc.yaml gives
it, in a scratch directory, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from pipeline.models.tiny_tokenizer import build_tiny_tokenizer
from tests.conftest import stage_commands, stage_module

REPO = Path(__file__).resolve().parents[1]


def tiny_params(judge_dir: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["phantom"].update(n_train=96, n_test=32, image_size=32, n_report=8)
    params["sft"].update(model="tiny", vision={}, vision_epochs=2, epochs=2, batch_size=16,
                         language_model="full", lm_lr=0.003, lm_train_rows=None, system_prompt=None)
    params["mine"].update(size=12)
    params["sample"].update(k=3, batch_size=8)
    params["rerank"].update(min_keep=1, min_gap=0.0, max_similarity=1.0)
    for judge in params["score"]["judges"]:
        judge.update(model=judge_dir, batch_size=8, max_new_tokens=8)
    params["score"]["rounds"] = 2
    params["score"]["retries"] = 0
    params["score"]["max_unscored"] = 1.0  # the random judge answers garbage: every response ends unscored
    params["score"]["prompts"] = str(REPO / "pipeline/judges/prompts.yaml")
    params["train"].update(epochs=1, batch_size=4, grad_accum=1)
    params["evaluate"].update(batch_size=16, max_new_tokens={"closed": 4, "open": 4}, report_max_new_tokens=6,
                              heldout_gap={"entries": 12, "seed": 0})
    return params


def save_tiny_judge(folder: Path) -> None:
    """A random tiny causal LM: it answers garbage, which the protocol must record as missing."""
    tokenizer = build_tiny_tokenizer(["score reason yes no { } : \" 0 1 2 3 4 5 6 7 8 9 10"], extra_words=["abcdef"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


COMMANDS = stage_commands()


def run(module: str) -> None:
    import importlib

    app = importlib.import_module(stage_module(module)).app
    result = CliRunner().invoke(app, COMMANDS[module], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_every_path_comes_from_dvc_yaml():
    """No stage option has a default: dvc.yaml's command line is the only source of paths."""
    import importlib

    import typer.main

    for name, argv in COMMANDS.items():
        command = typer.main.get_command(importlib.import_module(stage_module(name)).app)
        for param in command.params:
            if param.name in ("help", "progress"):
                continue
            assert param.required, f"{name}: --{param.name} has a default"
            assert param.help, f"{name}: --{param.name} has no help text"
            flag = param.opts[0]
            assert flag in argv, f"dvc.yaml does not pass {flag} to {name}"



def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch):
    save_tiny_judge(tmp_path / "models/judges/tiny")
    for folder in ("models/base", "models/embedders", "data/raw"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params("models/judges/tiny")))
    monkeypatch.chdir(tmp_path)
    run("prepare")
    assert pq.read_metadata("data/prepared/train.parquet").num_rows == 96
    assert pq.read_metadata("data/prepared/reports.parquet").num_rows == 8
    run("sft")
    sft_report = json.loads(Path("reports/sft.json").read_text())
    assert sft_report["sft_final_loss"] < sft_report["sft_first_loss"]
    assert (Path("models/sft") / "config.json").exists()
    run("mine")
    assert pq.read_metadata("data/pool.parquet").num_rows == 12
    run("sample")
    candidates = pq.read_table("data/candidates.parquet").to_pylist()
    assert len(candidates) == 12 and all(r["candidates"] for r in candidates)
    assert not Path("data/work/sample").exists() or not any(Path("data/work/sample").iterdir())
    run("rerank")
    ranked = pq.read_table("data/ranked.parquet").to_pylist()
    assert ranked and all(r["rejected"] for r in ranked)
    run("score")
    scored = pq.read_table("data/scored.parquet").to_pylist()
    assert len(scored) == len(ranked)
    assert all(len(r["judgements"]) == len(r["rejected"]) for r in scored)
    run("train")
    assert (Path("models/aligned") / "config.json").exists()
    run("evaluate@sft")
    run("evaluate@aligned")
    run("report")
    metrics = json.loads(Path("reports/metrics.json").read_text())
    for key in ("sft", "sft_blind"):
        assert 0.0 <= metrics[key]["closed_accuracy"] <= 1.0
        assert 0.0 <= metrics[key]["open_recall"] <= 1.0
    assert pq.read_metadata("reports/predictions/sft_blind.parquet").num_rows == 32
    # `report` combined the two per-model evaluations and added the deltas and the gaps
    per_model = {m: json.loads(Path(f"reports/evaluate/{m}.json").read_text()) for m in ("sft", "aligned")}
    for key in ("sft", "aligned"):
        assert {k: v for k, v in metrics[key].items() if k != "legacy"} == per_model[key][key]
    delta = metrics["aligned_minus_sft"]["closed_accuracy"]
    assert delta == pytest.approx(metrics["aligned"]["closed_accuracy"] - metrics["sft"]["closed_accuracy"])
    # HSCR Fig. 4 on 12 held-out test rows, candidates sampled for them; the training pool's gaps labelled apart
    test_rows = pq.read_table("data/prepared/test.parquet").to_pylist()
    for key in ("sft", "aligned"):
        heldout = metrics[f"{key}_logprob_gap"]
        assert heldout["data"] == "test (held out)" and heldout["entries"] == 12
        assert 0 < heldout["n"] == 12 - heldout["without_candidate"]
        assert sum(m["n"] for m in heldout["by_modality"].values()) == heldout["n"]
        low, high = heldout["mean_ci95"]  # a bootstrap interval over the entries, around the mean
        assert low <= heldout["mean"] <= high and low < high
        train = metrics[f"{key}_logprob_gap_train"]
        assert train["data"] == "train (preference pool)" and train["n"] == len(scored)
    assert not {r["id"] for r in test_rows} & {r["id"] for r in scored}
    for key in ("sft", "sft_blind", "aligned", "aligned_blind"):  # LLaVA-Med's run_eval.py numbers beside ours
        legacy = metrics[key]["legacy"]
        assert legacy["n_closed"] == metrics[key]["n_closed"] and legacy["n_open"] == metrics[key]["n_open"]
        assert legacy["closed_counted"] <= legacy["n_closed"]
        # evaluate's degenerate-prediction check and decoding caps reach the run's report
        assert set(metrics[key]["degenerate"]) == {"closed", "open"}
        assert metrics[key]["max_new_tokens"] == {"closed": 4, "open": 4}
        samples = Path(f"reports/predictions/{key}_samples.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(samples) == 32 and json.loads(samples[0])["doc_id"] == 0
    # the phantom report benchmark: every model and blind control wrote 8 reports, scored per benchmark
    for key in ("sft", "sft_blind", "aligned", "aligned_blind"):
        generated = pq.read_table(f"reports/report_predictions/{key}.parquet").to_pylist()
        assert len(generated) == 8 and {r["model"] for r in generated} == {key}
        assert all(0.0 <= r["rouge_l"] <= 1.0 and 0.0 <= r["meteor"] <= 1.0 for r in generated)
        scores = metrics[f"{key}_report_generation"]["phantom"]
        assert scores["n"] == 8 and scores["max_new_tokens"] == 6
        assert all(0.0 <= scores[m] <= 1.0 for m in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor"))
        assert scores["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in generated) / 8)
        assert scores["rouge_l_ci95"][0] <= scores["rouge_l"] <= scores["rouge_l_ci95"][1]
        model = key.removesuffix("_blind")
        assert metrics[f"{key}_report_generation"] == per_model[model][f"{key}_report_generation"]
    generation_delta = metrics["report_generation_deltas"]["aligned_minus_sft"]["phantom"]
    assert generation_delta["meteor"] == pytest.approx(metrics["aligned_report_generation"]["phantom"]["meteor"]
                                                       - metrics["sft_report_generation"]["phantom"]["meteor"])
    assert "by_dataset" not in metrics["sft"]  # one test dataset: the VQA entry keeps exactly its keys
    assert sorted(p.stem for p in Path("reports/plots/logprob_gap").glob("*.csv")) == sorted(
        metrics["sft_logprob_gap"]["by_modality"]) == sorted({r["modality"] for r in test_rows})
    run("html_report")  # the offline page: every section, a chart per curve and modality, no URL
    page = Path("reports/html/index.html").read_text(encoding="utf-8")
    for section in ('id="run"', 'id="metrics"', 'id="plots"', 'id="preferences"', "<footer>"):
        assert section in page
    for key in ("sft", "sft_blind", "aligned", "aligned_blind"):
        assert f"<tr><td><code>{key}</code></td>" in page
    charts = [*Path("reports/live").glob("*/plots/metrics/**/*.tsv"), *Path("reports/plots/logprob_gap").glob("*.csv")]
    assert page.count("<svg") == len(charts) and 'class="note"' not in page
    shown = yaml.safe_load(Path("params.yaml").read_text())["html_report"]["entries"]
    assert page.count('<article class="entry"') == min(len(scored), shown)
    assert "<mark" in page and "<details><summary>transcript" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page
