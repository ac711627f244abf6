"""LLM-judged evaluation (LLaVA-Med's relative-score protocol) with a scripted judge behind the real
response cache: parsing, re-asks, transcripts, failures, the summary's arithmetic."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import pipeline.stages.judged_eval as stage
from pipeline.errors import DataError, ParamsError
from pipeline.judged_evaluation import (
    JudgedEvalConfig,
    JudgedItem,
    JudgedItemInput,
    MalformedScores,
    evaluate_models,
    judge_answers,
    load_judged_eval_prompts,
    parse_scores,
    report_rows,
    select_ids,
    summarize,
)
from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import CachedJudge, JudgeError, JudgeRequest
from pipeline.judges.panel import Generation, HFJudgeConfig
from pipeline.judges.prompts import PromptFileError
from pipeline.params import build_config
from pipeline.schema import PREDICTION_SCHEMA, REPORT_PREDICTION_SCHEMA, VQA_SCHEMA, write_rows
from tests.test_judges_openai import ENV, KEY, ChatServer

PROMPTS = Path(__file__).resolve().parents[1] / "pipeline" / "judges" / "eval_prompts.yaml"


class ScriptedJudgeBackend:
    """Replies from `script`: the model's answer (Assistant 2) -> a list of replies, one per try
    (the last one repeats); answers in `fail` get no reply and a JudgeError, as the openai backend."""

    def __init__(self, script: dict[str, list[str]], fail: set[str] | None = None) -> None:
        self.script, self.fail = script, fail or set()
        self.calls: list[int] = []
        self.asked: list[JudgeRequest] = []

    def identity(self) -> dict:
        return {"backend": "scripted", "model": "scripted"}

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        self.calls.append(len(requests))
        failed = 0
        for i, request in enumerate(requests):
            answer = request.messages[1][1].split("[Assistant 2]\n")[1].split("\n")[0]
            if answer in self.fail:
                failed += 1
                continue
            self.asked.append(request)
            tries = sum(1 for role, _ in request.messages if role == "assistant")
            replies = self.script[answer]
            yield i, replies[min(tries, len(replies) - 1)]
        if failed:
            raise JudgeError(f"{failed} request(s) failed")


def cached_judge(cache: ResponseCache, backend, version: str) -> CachedJudge:
    config = HFJudgeConfig(name="evaluator", role="evaluator", backend="hf", model="scripted", prefill=False,
                           batch_size=8, max_new_tokens=64, temperature=0.0)
    return CachedJudge(config=config, backend=backend, cache=cache, prompt_version={"judged_eval": version})


def item(i: int, answer: str, answer_type: str = "open", modality: str = "CT") -> JudgedItemInput:
    return JudgedItemInput(id=f"q{i}", question=f"What is shown in image {i}?", about_image=modality,
                           reference=f"reference {i}", answer=answer,
                           groups={"answer_type": answer_type, "modality": modality})


@pytest.mark.parametrize(("reply", "expected"), [
    ("8 6", (8.0, 6.0)),
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
    ("\n  7.5, 9\n", (7.5, 9.0)),
    ("10/1", (10.0, 1.0)),
])
def test_parse_scores_reads_the_first_line(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply", ["", "9", "11 3", "0 5", "8 6 because", "Assistant 1: 8, Assistant 2: 6",
                                   "I rate them\n8 6"])
def test_parse_scores_refuses_what_is_not_two_scores_in_range(reply):
    with pytest.raises(MalformedScores):
        parse_scores(reply)


def test_scores_reasks_transcripts_and_failures(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    backend = ScriptedJudgeBackend({
        "good": ["8 6\nAssistant 2 misses the size."],
        "late": ["Assistant 2 is fine.", "9 9"],  # malformed once, then right after the re-ask
        "never": ["no scores here"],
    }, fail={"down"})
    items = [item(0, "good"), item(1, "late", modality="MRI"), item(2, "never"), item(3, "down", "closed")]
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judged = judge_answers(cached_judge(cache, backend, prompts.version), prompts, items, retries=2)

    assert backend.calls == [4, 2, 1]  # every try is one batch; a backend failure is not re-asked in this run
    by_id = {j.id: j for j in judged}
    assert (by_id["q0"].reference_score, by_id["q0"].model_score, by_id["q0"].failure) == (8.0, 6.0, None)
    assert (by_id["q1"].reference_score, by_id["q1"].model_score) == (9.0, 9.0)
    assert by_id["q2"].failure == "malformed" and by_id["q2"].model_score is None
    assert by_id["q3"].failure == "backend" and by_id["q3"].transcript[0]["reply"] is None

    late = by_id["q1"].transcript
    assert [t["reply"] for t in late] == ["Assistant 2 is fine.", "9 9"]
    retry_messages = late[1]["messages"]
    assert [m["role"] for m in retry_messages] == ["system", "user", "assistant", "user"]
    assert retry_messages[2]["content"] == "Assistant 2 is fine."
    assert "could not be read" in retry_messages[3]["content"]
    assert len(by_id["q2"].transcript) == 3  # the first try and two re-asks
    first_turn = by_id["q0"].transcript[0]["messages"][1]["content"]
    assert "What is shown in image 0?" in first_turn and "reference 0" in first_turn and "CT" in first_turn
    assert first_turn.index("[Assistant 1]\nreference 0") < first_turn.index("[Assistant 2]\ngood")

    summary = summarize(judged)
    assert summary["overall"]["items"] == 4 and summary["overall"]["scored"] == 2
    assert summary["overall"]["reference_score"] == pytest.approx(8.5)
    assert summary["overall"]["model_score"] == pytest.approx(7.5)
    # LLaVA-Med: the mean of per-item ratios (6/8, 9/9), not the ratio of the means (7.5/8.5)
    assert summary["overall"]["relative_score"] == pytest.approx(100 * (6 / 8 + 1.0) / 2)
    assert summary["modality"]["MRI"]["relative_score"] == pytest.approx(100.0)
    assert summary["answer_type"]["closed"] == {"items": 1, "scored": 0, "unscored": 1, "reference_score": None,
                                                "model_score": None, "relative_score": None}
    assert summary["unscored_by_cause"] == {"malformed": 1, "backend": 1}


def test_a_rerun_answers_from_the_cache_and_asks_only_the_failed_again(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    items = [item(0, "good"), item(1, "down")]
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        first = judge_answers(cached_judge(cache, ScriptedJudgeBackend({"good": ["7 7"]}, fail={"down"}),
                                           prompts.version), prompts, items, retries=0)
    assert [j.failure for j in first] == [None, "backend"]
    backend = ScriptedJudgeBackend({"good": ["1 1"], "down": ["6 3"]})  # "good" must come from the cache
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judge = cached_judge(cache, backend, prompts.version)
        again = judge_answers(judge, prompts, items, retries=0)
    assert backend.calls == [1] and judge.stats.hits == 1
    assert [(j.reference_score, j.model_score) for j in again] == [(7.0, 7.0), (6.0, 3.0)]


def test_summary_of_nothing_scored_has_no_numbers():
    unscored = JudgedItem(id="a", groups={}, reference_score=None, model_score=None, failure="malformed",
                          transcript=[])
    assert summarize([unscored])["overall"]["relative_score"] is None


def test_prompt_file_errors_name_the_problem(tmp_path):
    text = PROMPTS.read_text()
    bad = tmp_path / "p.yaml"
    bad.write_text(text.replace("$answer", "$response"))
    with pytest.raises(PromptFileError, match="unknown placeholder"):
        load_judged_eval_prompts(bad)
    bad.write_text(text.replace("retry_turn:", "retry:"))
    with pytest.raises(PromptFileError, match="retry_turn"):
        load_judged_eval_prompts(bad)


def test_negative_retries_is_an_error(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    with ResponseCache(tmp_path / "c.sqlite") as cache, pytest.raises(ValueError, match="retries"):
        judge_answers(cached_judge(cache, ScriptedJudgeBackend({}), prompts.version), prompts, [], retries=-1)


def prediction(i: int, prediction: str, answer_type: str = "open") -> dict:
    return {"id": f"t{i}", "model": "m", "question": f"q{i}?", "answer": f"a{i}", "prediction": prediction,
            "answer_type": answer_type, "modality": "ct", "question_type": "size", "score": 0.0}


def config(**overrides) -> JudgedEvalConfig:
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["judged_eval"]
    return build_config(JudgedEvalConfig, {**raw, "enabled": True, **overrides}, "judged_eval")


def test_every_model_is_judged_on_the_same_seeded_items(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    sft = [prediction(i, f"wrong{i}") for i in range(10)] + [prediction(10, "yes", "closed")]
    aligned = [prediction(i, f"a{i}") for i in range(10)] + [prediction(10, "no", "closed")]
    script = {f"wrong{i}": ["8 4"] for i in range(10)} | {f"a{i}": ["8 8"] for i in range(10)}
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judge = cached_judge(cache, ScriptedJudgeBackend(script), prompts.version)
        metrics, lines = evaluate_models(judge, prompts, config(max_items=4, seed=3), {"sft": sft, "aligned": aligned})
    chosen = select_ids(sft, ["open"], 4, 3)
    assert len(chosen) == 4 and chosen == sorted(chosen) and "t10" not in chosen
    assert chosen != select_ids(sft, ["open"], 4, 4)  # the seed picks the items
    assert [line["id"] for line in lines] == chosen + chosen
    assert [line["model"] for line in lines] == ["sft"] * 4 + ["aligned"] * 4
    assert metrics["items"] == 4 and metrics["prompt_version"] == "judged-eval-1"
    assert metrics["models"]["sft"]["overall"]["relative_score"] == pytest.approx(50.0)
    assert metrics["models"]["aligned"]["overall"]["relative_score"] == pytest.approx(100.0)
    assert lines[0]["transcript"][0]["reply"] == "8 4"


def test_the_judge_reads_an_entrys_earlier_turns_before_its_question(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    sft = [prediction(i, f"a{i}") for i in range(3)]
    contexts = {"t1": [{"question": "Which modality is this?", "answer": "a CT scan"}]}
    backend = ScriptedJudgeBackend({f"a{i}": ["8 8"] for i in range(3)})
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judge = cached_judge(cache, backend, prompts.version)
        evaluate_models(judge, prompts, config(max_items=None), {"sft": sft}, contexts)
    users = {r.messages[1][1].split("[Assistant 2]\n")[1].split("\n")[0]: r.messages[1][1] for r in backend.asked}
    assert "Earlier in this conversation about the same image:\nQ: Which modality is this?\nA: a CT scan" in users["a1"]
    assert "Earlier in this conversation" not in users["a0"] and "Earlier in this conversation" not in users["a2"]


def test_a_model_without_a_judged_item_is_an_error(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    with ResponseCache(tmp_path / "c.sqlite") as cache, pytest.raises(DataError, match="no prediction for 1"):
        judge = cached_judge(cache, ScriptedJudgeBackend({"x": ["5 5"]}), prompts.version)
        evaluate_models(judge, prompts, config(max_items=None),
                        {"sft": [prediction(0, "x"), prediction(1, "x")], "aligned": [prediction(0, "x")]})


def test_prefill_is_refused_and_the_stage_off_writes_only_that(tmp_path):
    with pytest.raises(ParamsError, match="prefill must be false"):
        config(judge={**config().judge.model_dump(), "prefill": True})
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    (tmp_path / "predictions").mkdir()
    (tmp_path / "judges").mkdir()
    (tmp_path / "test.parquet").write_bytes(b"")  # off: never read
    result = CliRunner().invoke(stage.app, [
        "--params", str(params), "--predictions", str(tmp_path / "predictions"),
        "--report-predictions", str(tmp_path / "predictions"), "--test", str(tmp_path / "test.parquet"), "--model", "sft",
        "--model-root", str(tmp_path / "judges"), "--cache", str(tmp_path / "c.sqlite"),
        "--metrics", str(tmp_path / "m.json"), "--transcripts", str(tmp_path / "t" / "t.jsonl")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text()) == {"enabled": False}
    assert (tmp_path / "t" / "t.jsonl").read_text() == ""
    assert not (tmp_path / "c.sqlite").exists()  # nothing loaded, nothing asked


def report_prediction(i: int, prediction: str) -> dict:
    return {"id": f"r{i}", "model": "m", "dataset": "phantom", "modality": "ct",
            "prompt": "Describe the findings of this image.", "report": f"Axial CT. Lesion {i}.",
            "prediction": prediction, "rouge_l": 0.0, "meteor": 0.0}


def test_generated_reports_are_judged_as_their_own_answer_type_and_sampled_apart(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    vqa = [prediction(i, f"a{i}") for i in range(30)]
    reports = report_rows([report_prediction(i, f"report{i}") for i in range(3)])
    assert reports[1] | {"prediction": None} == {
        "id": "r1", "question": "Describe the findings of this image.", "answer": "Axial CT. Lesion 1.",
        "prediction": None, "answer_type": "report", "modality": "ct"}
    # each type is sampled on its own: 2 of the 3 reports, not a share of 2 among 33 rows
    chosen = select_ids(vqa + reports, ["open", "report"], 2, 0)
    assert len(chosen) == 4 and sum(i.startswith("r") for i in chosen) == 2
    assert select_ids(vqa, ["open"], 2, 0) == [i for i in chosen if i.startswith("t")]  # one type: as before
    backend = ScriptedJudgeBackend({f"a{i}": ["8 8"] for i in range(30)} | {f"report{i}": ["8 2"] for i in range(3)})
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judge = cached_judge(cache, backend, prompts.version)
        metrics, lines = evaluate_models(judge, prompts, config(answer_types=["open", "report"], max_items=None),
                                         {"sft": vqa + reports})
    by_type = metrics["models"]["sft"]["answer_type"]
    assert by_type["report"]["items"] == 3 and by_type["report"]["relative_score"] == pytest.approx(25.0)
    assert by_type["open"]["relative_score"] == pytest.approx(100.0)
    asked = next(r.messages[1][1] for r in backend.asked if "report1" in r.messages[1][1])
    assert "[Question]\nDescribe the findings of this image." in asked
    assert "[Assistant 1]\nAxial CT. Lesion 1.\n[End of Assistant 1]" in asked
    assert {line["reference"] for line in lines if line["id"] == "r2"} == {"Axial CT. Lesion 2."}


def test_an_answer_type_without_items_is_an_error_naming_it(tmp_path):
    prompts = load_judged_eval_prompts(PROMPTS)
    with ResponseCache(tmp_path / "c.sqlite") as cache, pytest.raises(DataError, match=r"\['report'\].*n_report"):
        judge = cached_judge(cache, ScriptedJudgeBackend({"x": ["5 5"]}), prompts.version)
        evaluate_models(judge, prompts, config(answer_types=["open", "report"], max_items=None),
                        {"sft": [prediction(0, "x")]})


class EvaluatorServer(ChatServer):
    """The loopback OpenAI-compatible server as an evaluator: a model's answer `RESPONSE<<x>>` gets
    the reply scripted for x in `scores`."""

    scores = {"vqa-good": "8 8", "vqa-bad": "8 4", "report-good": "6 6\nBoth describe the lesion.",
              "report-bad": "8 2\nAssistant 2 invents findings."}

    def verdict(self, model: str, user: str, response: str) -> str:
        return self.scores[response]


def test_the_stage_judges_answers_and_reports_through_an_openai_server(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    with EvaluatorServer() as server:
        raw["judged_eval"] |= {"enabled": True, "answer_types": ["open", "report"], "max_items": None, "judge": {
            "name": "evaluator", "role": "evaluator", "backend": "openai", "model": "judge-a", "base_url": server.url,
            "api_key_env": ENV, "timeout_s": 5.0, "max_concurrency": 2, "max_new_tokens": 48, "temperature": 0.0,
            "extra_body": {}, "preflight": True, "structured_output": "none", "sampling_fields": {}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        for folder in ("predictions", "reports", "judges"):
            (tmp_path / folder).mkdir()
        for name, quality in (("sft", "bad"), ("aligned", "good")):
            vqa = [prediction(i, f"RESPONSE<<vqa-{quality}>>") for i in range(2)] + [prediction(2, "yes", "closed")]
            write_rows(vqa, tmp_path / "predictions" / f"{name}.parquet", PREDICTION_SCHEMA)
            reports = [report_prediction(i, f"RESPONSE<<report-{quality}>>") for i in range(3)]
            write_rows(reports, tmp_path / "reports" / f"{name}.parquet", REPORT_PREDICTION_SCHEMA)
        write_rows([], tmp_path / "test.parquet", VQA_SCHEMA)
        args = ["--params", str(tmp_path / "params.yaml"), "--predictions", str(tmp_path / "predictions"),
                "--report-predictions", str(tmp_path / "reports"), "--test", str(tmp_path / "test.parquet"),
                "--model", "sft", "--model", "aligned", "--model-root", str(tmp_path / "judges"),
                "--cache", str(tmp_path / "c.sqlite"), "--metrics", str(tmp_path / "m.json"),
                "--transcripts", str(tmp_path / "t.jsonl")]
        result = CliRunner().invoke(stage.app, args)
        assert result.exit_code == 0, result.output
        asked = len(server.requests)
        assert asked == 10  # 2 open answers + 3 reports, per model; the closed one is not judged
        assert CliRunner().invoke(stage.app, args).exit_code == 0
        assert len(server.requests) == asked  # the rerun answers from the cache
    metrics = json.loads((tmp_path / "m.json").read_text())
    sft, aligned = metrics["models"]["sft"]["answer_type"], metrics["models"]["aligned"]["answer_type"]
    assert (sft["open"]["relative_score"], sft["report"]["relative_score"]) == (pytest.approx(50.0), pytest.approx(25.0))
    assert (aligned["open"]["relative_score"], aligned["report"]["relative_score"]) == (100.0, 100.0)
    assert metrics["models"]["sft"]["overall"]["items"] == 5
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    report_line = next(line for line in lines if line["model"] == "sft" and line["id"] == "r0")
    assert (report_line["answer_type"], report_line["reference"]) == ("report", "Axial CT. Lesion 0.")
    assert report_line["transcript"][0]["reply"].startswith("8 2")
