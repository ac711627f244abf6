"""The offline HTML page (`pipeline.html_report`) on small fixtures written here: every section is
there, nothing on it could load from a network, and text is escaped."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import DataError, ParamsError
from pipeline.evaluation import MaxNewTokens
from pipeline.html_report import (
    HtmlReportConfig,
    PlotGroup,
    build_page,
    external_references,
    gap_plots,
    mark_replacements,
    model_answers,
    read_curves,
    render_svg,
    sample_entries,
    token_text,
    training_plots,
)
from pipeline.params import load_params, project_config, project_params_path, section_config

MODELS = ("sft", "sft_blind", "aligned", "aligned_blind")


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def prediction_tables() -> dict[str, list[dict]]:
    """30 closed and 10 open questions: `aligned` answers every closed one right, `sft` half of them."""
    tables: dict[str, list[dict]] = {}
    for model in MODELS:
        rows = []
        for i in range(40):
            closed = i < 30
            right = (model.startswith("aligned") and not model.endswith("_blind")) or i % 2 == 0
            rows.append({"id": f"q{i:02d}", "model": model, "question": f"question {i}?",
                         "answer": "yes" if closed else "left lung", "prediction": "yes" if right else "no",
                         "answer_type": "closed" if closed else "open", "modality": "ct",
                         "question_type": "presence", "score": float(right) if closed else 0.5})
        tables[model] = rows
    return tables


def metrics_report(tables: dict[str, list[dict]]) -> dict:
    from pipeline.legacy_metrics import legacy_reports
    from pipeline.metrics import summarize

    report: dict = {}
    legacy = legacy_reports(tables)
    for model, rows in tables.items():
        report[model] = {**summarize(rows), "legacy": legacy[model]}
    report["sft_logprob_gap"] = {"mean": 0.5, "median": 0.4, "n": 2, "by_modality": {}}
    report["aligned_logprob_gap"] = {"mean": 1.5, "median": 1.4, "n": 2, "by_modality": {}}
    report["aligned_minus_sft"] = {"closed_accuracy": 0.5, "open_recall": 0.0,
                                   "image_reliance_closed_accuracy": 0.5, "image_reliance_open_recall": 0.0}
    return report


TRANSCRIPT = json.dumps([
    {"turn": 1, "round": 1, "judge": "radiologist", "shown": None, "score": 3, "reason": "wrong organ",
     "answers": ['{"score": 3, "reason": "wrong organ"}'], "errors": []},
    {"turn": 2, "round": 1, "judge": "clinician", "shown": {"judge": "radiologist", "score": 3}, "score": 3,
     "reason": "agree", "answers": ['{"score": 3}'], "errors": []},
])


def scored_rows() -> list[dict]:
    judgement = {"score": 3.0, "rounds": 1, "agreed": True, "weight": 1.1, "transcript": TRANSCRIPT}
    rows = []
    for i, question in enumerate(["<b>x</b> is the lesion small or large?", "Where is the nodule?",
                                  "see http://example.org/atlas, which lobe?"]):
        rows.append({
            "id": f"e{i}", "dataset": "unit", "split": "train", "image": png((40 * i, 90, 90)),
            "question": question, "answer": "the lesion is small", "answer_type": "open", "modality": "ct",
            "question_type": "size",
            "context": [],
            "rejected": [{"text": "the lesion is large", "similarity": 0.8, "level": 1, "logprob": -2.0}],
            "judgements": [judgement],
            "rationale": {"text": "it measures 4 mm", "judge": "radiologist", "prompt_version": "1", "cache_key": "k"},
            "counterfactuals": [None],
            "visual_dispreferred": {"image": png((200, 0, 0)), "region": "annotation", "region_fraction": 0.2,
                                    "confidence": 0.9, "weight": 1.05} if i == 0 else None,
        })
    return rows


def candidate_rows() -> list[dict]:
    candidate = {"text": "the lesion is large", "token_ids": [1, 2, 3, 4], "level": 1, "positions": [3],
                 "original_tokens": ["Ġsmall"], "replacement_tokens": ["Ġlarge"], "logprob": -2.0}
    return [{"id": f"e{i}", "candidates": [candidate]} for i in range(3)]


def write_live(root: Path) -> None:
    metrics = root / "sft" / "plots" / "metrics" / "lm"
    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n0\t2.0\n1\t1.5\n2\t1.2\n")


def write_gaps(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "ct.csv").write_text("gap,sft,aligned\n-0.5,1,0\n0.5,1,1\n1.5,0,1\n")


def config(**changes) -> HtmlReportConfig:
    return project_config(HtmlReportConfig, "html_report", **{"entries": 2, "bootstrap_resamples": 200, **changes})


def page(tmp_path: Path, live: Path | None = None) -> str:
    live = live or tmp_path / "live"
    if not live.exists() and live == tmp_path / "live":
        write_live(live)
    gaps = tmp_path / "gaps"
    if not gaps.exists():
        write_gaps(gaps)
    tables = prediction_tables()
    scored = scored_rows()
    cfg = config(entries=3)
    entries = sample_entries(scored, cfg.entries, cfg.seed)
    answers = {m: {"image": ["small"] * len(entries), "blind": ["<i>no</i>"] * len(entries)} for m in ("sft", "aligned")}
    plots = [training_plots("sft", live / "sft"), training_plots("train", live / "train"), gap_plots(gaps)]
    return build_page(config=cfg, metrics=metrics_report(tables), tables=tables, plots=plots, entries=entries,
                      total_entries=len(scored), candidates=candidate_rows(), answers=answers,
                      sources={"metrics": "reports/metrics.json"})


def test_the_page_has_every_section(tmp_path):
    html = page(tmp_path)
    for section in ('id="run"', 'id="metrics"', 'id="plots"', 'id="preferences"', "<footer>"):
        assert section in html
    # a table row per model, each with a 95% interval, and the significant closed-accuracy gain marked
    for model in MODELS:
        assert re.search(rf"<tr><td><code>{model}</code></td><td>30</td><td>[0-9.]+ <span class=\"ci\">\[[0-9.]+, "
                         r"[0-9.]+\]</span>", html), model
    aligned = re.search(r"<tr><td><code>aligned</code></td>.*?</tr>", html).group(0)
    assert 'class="sig"' in aligned and "★" in aligned and "McNemar" in aligned
    sft_blind = re.search(r"<tr><td><code>sft_blind</code></td>.*?</tr>", html).group(0)
    assert "baseline" in sft_blind and 'class="sig"' not in sft_blind
    assert "aligned_minus_sft" in html
    assert "(30/30 counted)" in html  # legacy: every closed answer says yes or no
    # plots: one inline SVG per curve and per modality, no note where there is data
    assert html.count("<svg") == 2
    assert "lm/loss" in html and "<figcaption>ct</figcaption>" in html
    # the browser: images, marked replacement, transcript, rationale, visual dispreferred, answers
    assert html.count('src="data:image/png;base64,') == 3 + 1
    assert 'the lesion is <mark title="was: small">large</mark>' in html
    assert "replaced: small → large" in html
    assert "<details><summary>transcript (2 turns)</summary>" in html and "wrong organ" in html
    assert "it measures 4 mm" in html and "visual dispreferred x*: annotation, 20.0% noised" in html
    assert "small <span class=\"ok\">✓</span>" not in html  # open answer: recall, not a tick
    assert "&lt;i&gt;no&lt;/i&gt;" in html


def test_the_page_loads_nothing_from_a_network(tmp_path):
    html = page(tmp_path)
    assert "http://" not in html and "https://" not in html
    assert external_references(html) == []
    assert "<script" not in html
    # a URL written in a question is shown as written, but cannot be read as one
    assert "see http:&#47;&#47;example.org/atlas" in html


def test_text_is_escaped(tmp_path):
    html = page(tmp_path)
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt; is the lesion small or large?" in html


def test_a_missing_live_folder_gives_a_note(tmp_path):
    group = training_plots("train", tmp_path / "nowhere" / "train")
    assert group.plots == () and "does not exist" in group.note
    (tmp_path / "empty").mkdir()
    empty = gap_plots(tmp_path / "empty")
    assert empty.plots == () and "holds no histograms" in empty.note
    html = page(tmp_path, live=tmp_path / "nowhere")
    assert '<p class="note">No training curves:' in html
    assert html.count("<svg") == 1  # the gap histogram only


def test_a_malformed_curve_is_a_data_error(tmp_path):
    folder = tmp_path / "sft" / "plots" / "metrics"
    folder.mkdir(parents=True)
    (folder / "loss.tsv").write_text("step\tloss\n0\tnot-a-number\n")
    with pytest.raises(DataError, match="loss.tsv loss: 'not-a-number' is not a number"):
        read_curves(tmp_path / "sft")


def test_rendered_svg_is_inline_and_offline():
    svg = render_svg({"data": {"values": [{"step": 0, "value": 1.0}, {"step": 1, "value": 0.5}]}, "mark": "line",
                      "encoding": {"x": {"field": "step", "type": "quantitative"},
                                   "y": {"field": "value", "type": "quantitative"}}}, "unit")
    assert svg.startswith("<svg") and "xmlns" not in svg
    assert external_references(svg) == []


@pytest.mark.parametrize("snippet", [
    '<img src="https://cdn.example/x.png">', '<img src="//cdn.example/x.png">', '<link rel="stylesheet" href="a.css">',
    "<script>fetch(1)</script>", '<div style="background: url(x.png)"></div>', "<style>@import 'x.css';</style>",
    '<a href="page2.html">x</a>', '<meta http-equiv="refresh" content="0">',
])
def test_external_references_are_found(snippet):
    assert external_references(snippet)


def test_inline_references_are_allowed():
    assert external_references('<img src="data:image/png;base64,AAAA"><a href="#metrics">m</a>'
                               '<rect style="fill: url(#grad)"/>') == []


@pytest.mark.parametrize(("token", "expected"), [("Ġlarge", " large"), ("▁large", " large"), ("##er", "er"),
                                                 ("large", "large"), ("ĠcafÃ©", " café")])
def test_token_text(token, expected):
    assert token_text(token) == expected


def test_mark_replacements_in_position_order_and_escaped():
    candidate = {"positions": [4, 1], "original_tokens": ["Ġright", "Ġsmall"],
                 "replacement_tokens": ["Ġ<left>", "Ġlarge"]}
    assert (mark_replacements("a large mass, <left>", candidate)
            == 'a <mark title="was: small">large</mark> mass, <mark title="was: right">&lt;left&gt;</mark>')
    assert mark_replacements("a <b>", None) == "a &lt;b&gt;"
    assert mark_replacements("nothing here", {"positions": [0], "original_tokens": ["a"],
                                              "replacement_tokens": ["zzz"]}) == "nothing here"


def test_sample_entries_is_seeded_and_in_file_order():
    rows = [{"id": str(i)} for i in range(50)]
    first = sample_entries(rows, 5, 0)
    assert first == sample_entries(rows, 5, 0) and first != sample_entries(rows, 5, 1)
    assert [int(r["id"]) for r in first] == sorted(int(r["id"]) for r in first)
    assert len(sample_entries(rows[:3], 5, 0)) == 3


def test_model_answers_with_and_without_the_image(tiny_vlm, rows):
    loaded: list[str] = []

    def load(folder: str):
        loaded.append(folder)
        return tiny_vlm

    answers = model_answers(load, [("sft", "models/sft"), ("aligned", "models/aligned")], rows[:5], 2,
                            MaxNewTokens(closed=3, open=3))
    assert loaded == ["models/sft", "models/aligned"]  # each model loaded once
    assert set(answers) == {"sft", "aligned"}
    assert all(len(a["image"]) == len(a["blind"]) == 5 for a in answers.values())


def test_the_config_reads_the_evaluate_settings_and_the_run_keys():
    params = load_params(project_params_path())
    cfg = section_config(HtmlReportConfig, params, "html_report")
    assert cfg.answer_batch_size == params["evaluate"]["batch_size"]
    assert cfg.answer_max_new_tokens.to_dict() == params["evaluate"]["max_new_tokens"]
    assert cfg.run_facts["train.loss"] == params["train"]["loss"] and cfg.run_facts["mask_ratio"] == params["mask_ratio"]
    copy = cfg.replace(entries=3)
    assert copy.entries == 3 and copy.answer_max_new_tokens == cfg.answer_max_new_tokens
    params["evaluate"]["max_new_tokens"] = {"closed": 0, "open": 16}
    with pytest.raises(ParamsError, match="`evaluate.max_new_tokens` must map every answer type to an integer >= 1"):
        section_config(HtmlReportConfig, params, "html_report")


def test_plot_group_note_is_shown_instead_of_charts(tmp_path):
    from pipeline.html_report import plots_section

    html = plots_section([PlotGroup("curves", "reports/live/sft", (), "No training curves: gone.")])
    assert '<p class="note">No training curves: gone.</p>' in html and "<svg" not in html


def test_the_same_inputs_give_the_same_bytes(tmp_path):
    """A cached DVC output: no timestamp, no random ids, so a rerun leaves dvc.lock unchanged."""
    assert page(tmp_path) == page(tmp_path)
