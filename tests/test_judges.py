"""The judge panel: parsing, config, prompts, the consensus protocol, weights, cache and resume, hf backend."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.errors import ParamsError
from pipeline.judges.cache import ResponseCache
from pipeline.judges.consensus import run_consensus
from pipeline.judges.judge import CachedJudge, JudgeRequest, request_key
from pipeline.judges.metrics import score_metrics
from pipeline.judges.panel import (
    Generation,
    HFJudgeConfig,
    PanelConfigError,
    ScoreConfig,
    WeightConfig,
    parse_score_config,
)
from pipeline.judges.parsing import MalformedAnswer, parse_answer
from pipeline.judges.prompts import Case, Previous, PromptFileError, load_prompts
from pipeline.judges.scoring import check_panel, score_rows
from pipeline.judges.weights import clinical_weights, standardize
from pipeline.params import load_params, project_params_path
from pipeline.schema import RANKED_SCHEMA, SCORED_SCHEMA, read_rows, write_rows

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "pipeline" / "judges" / "prompts.yaml"

# A prompt file whose user turn is easy for scripted judges to read.
SCRIPT_PROMPTS = """\
version: test-1
prefill: '{"score": '
roles:
  a: You are judge A.
  b: You are judge B.
rubric: 'Reply {"score": <0-10>, "reason": "..."}'
first_turn: 'RESPONSE<<$response>> Q<<$question>> REF<<$reference>>'
followup_turn: 'RESPONSE<<$response>> Q<<$question>> REF<<$reference>> PREVIOUS<<$previous_score>> by $previous_judge: $previous_reason'
retry_turn: 'RETRY<<$error>>'
"""


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(SCRIPT_PROMPTS)
    return load_prompts(path)


def read_turn(request: JudgeRequest) -> tuple[str, int | None, bool]:
    """(dispreferred response, previous score shown or None, is a retry) from a scripted-prompt request."""
    user = request.messages[-1][1]
    response = re.search(r"RESPONSE<<(.*?)>>", user).group(1)
    previous = re.search(r"PREVIOUS<<(\d+)>>", user)
    return response, int(previous.group(1)) if previous else None, "RETRY<<" in user


def answer(score: int | str, reason: str = "scripted") -> str:
    return json.dumps({"score": score, "reason": reason})


class ScriptedJudge:
    """A judge answering from a function of (response, previous score, is_retry) -> raw answer."""

    def __init__(self, name: str, script: Callable[[str, int | None, bool], str], role: str = "a") -> None:
        self.name, self.role, self.prefill = name, role, False
        self.script = script
        self.calls: list[int] = []  # batch sizes

    def ask(self, requests: Sequence[JudgeRequest]) -> list[str]:
        self.calls.append(len(requests))
        return [self.script(*read_turn(r)) for r in requests]


def fixed(table: dict[str, int]) -> Callable[[str, int | None, bool], str]:
    return lambda response, previous, retry: answer(table[response])


# --------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, score",
    [
        ('{"score": 7, "reason": "wrong side"}', 7),
        ('Sure! {"score": 0, "reason": ""} Hope that helps.', 0),
        ('```json\n{"reason": "r", "score": 10}\n```', 10),
        ('{"score": 3, "reason": "stop string"}}', 3),  # a stop-at-"}" decode may leave a brace
    ],
)
def test_parse_accepts_one_verdict_object(text, score):
    assert parse_answer(text).score == score


@pytest.mark.parametrize(
    "text",
    [
        "",
        "seven",
        '{"score": 7, "reason": "unterminated',
        '{"score": 7.5, "reason": "r"}',
        '{"score": 7.0, "reason": "r"}',
        '{"score": "7", "reason": "r"}',
        '{"score": true, "reason": "r"}',
        '{"score": 11, "reason": "r"}',
        '{"score": -1, "reason": "r"}',
        '{"score": 7}',
        '{"score": 7, "reason": "r", "type": "JSON"}',
        '{"score": 7, "reason": 3}',
        '{"score": 7, "reason": "r"} {"score": 2, "reason": "r"}',
        "[7]",
    ],
)
def test_parse_rejects_everything_else(text):
    with pytest.raises(MalformedAnswer):
        parse_answer(text)


# ---------------------------------------------------------------------------------------------- config

DEFAULT_SECTION = load_params(project_params_path())["score"]
WEIGHTS = WeightConfig(**DEFAULT_SECTION["weights"])


def test_default_panel_parses_and_fits_the_prompt_file():
    config = parse_score_config(DEFAULT_SECTION)
    assert [j.name for j in config.judges] == ["radiologist", "clinician"]
    assert config.rounds == 5 and config.weights.mu == 1.0 and config.weights.clip == (0.75, 1.25)
    assert math.isclose(config.weights.sigma, math.sqrt(0.1))
    check_panel(config, load_prompts(DEFAULT_PROMPTS))


OPENAI_JUDGE = {"name": "med42", "role": "radiologist", "backend": "openai", "model": "m42",
                "base_url": "http://localhost:8000/v1", "api_key_env": "VLLM_API_KEY", "timeout_s": 60.0,
                "max_concurrency": 8, "max_new_tokens": 48, "temperature": 0.0, "extra_body": {},
                "preflight": True, "structured_output": "none", "sampling_fields": {}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rounds": 0}, "`score.rounds` must be greater than or equal to 1"),
        ({"roundz": 5}, "unknown key `score.roundz`; did you mean `score.rounds`"),
        ({"judges": []}, "at least one judge"),
        ({"judges": [DEFAULT_SECTION["judges"][0]] * 2}, "duplicate"),
        ({"judges": [{**OPENAI_JUDGE, "base_url": None}]}, "`score.judges\\[0\\].base_url` must be a valid string"),
        ({"judges": [{**OPENAI_JUDGE, "api_key_env": "sk-abc123-this-is-a-key"}]}, "NAME of an environment variable"),
        ({"judges": [{**OPENAI_JUDGE, "prefill": True}]}, "unknown key `score.judges\\[0\\].prefill`"),
        ({"judges": [{**OPENAI_JUDGE, "base_url": "localhost:8000/v1"}]}, "must start with http:// or https://"),
        ({"judges": [{**OPENAI_JUDGE, "base_url": "http://h:8000/v1/chat/completions"}]}, "is the API root"),
        ({"judges": [{**OPENAI_JUDGE, "sampling_fields": {"top_p": None}}]}, "can rename or drop only"),
        ({"judges": [{**OPENAI_JUDGE, "sampling_fields": {"temperature": "max_tokens"}}]}, "already has"),
        ({"judges": [{**OPENAI_JUDGE, "sampling_fields": {"max_tokens": "max tokens"}}]}, "request field name"),
        ({"judges": [{**OPENAI_JUDGE, "structured_output": "json"}]}, "structured_output` must be"),
        ({"judges": [{**OPENAI_JUDGE, "structured_output": "guided_json", "extra_body": {"guided_json": {}}}]},
         "remove it from extra_body"),
        ({"judges": [{**OPENAI_JUDGE, "sampling_fields": {"max_tokens": "n_predict"},
                      "extra_body": {"n_predict": 3}}]}, "which extra_body also sets"),
        ({"max_unscored": 1.5}, "`score.max_unscored` must be less than or equal to 1"),
        ({"request_retry": {**DEFAULT_SECTION["request_retry"], "max_consecutive_failures": 0}},
         "max_consecutive_failures` must be greater than or equal to 1"),
        ({"judges": [{**DEFAULT_SECTION["judges"][0], "base_url": "http://x"}]}, "unknown key `score.judges\\[0\\].base_url`"),
        ({"judges": [{**DEFAULT_SECTION["judges"][0], "backend": "vllm"}]}, "backend` must be one of 'hf', 'openai'"),
        ({"judges": [{**DEFAULT_SECTION["judges"][0], "temperature": -1}]}, "temperature` must be greater than or equal to 0"),
        ({"weights": {**DEFAULT_SECTION["weights"], "clip": [1.25, 0.75]}}, "0 <= low < high"),
        ({"weights": {**DEFAULT_SECTION["weights"], "mu": 2.0}}, "inside clip"),
        ({"weights": {"mu": 1.0}}, "`score.weights.sigma` is missing"),
    ],
)
def test_bad_config_fails_with_a_clear_error(change, message):
    with pytest.raises(ParamsError, match=message):
        parse_score_config({**DEFAULT_SECTION, **change})


def test_unknown_role_and_missing_prefill_are_caught_before_judging(tmp_path):
    prompts = load_prompts(DEFAULT_PROMPTS)
    bad_role = parse_score_config({**DEFAULT_SECTION, "judges": [{**DEFAULT_SECTION["judges"][0], "role": "surgeon"}]})
    with pytest.raises(PanelConfigError, match="surgeon"):
        check_panel(bad_role, prompts)
    path = tmp_path / "p.yaml"
    path.write_text(DEFAULT_PROMPTS.read_text().replace("prefill: '{\"score\": '", "prefill: ''"))
    with pytest.raises(PanelConfigError, match="prefill"):
        check_panel(parse_score_config(DEFAULT_SECTION), load_prompts(path))


# --------------------------------------------------------------------------------------------- prompts


def test_default_prompts_render_every_turn():
    prompts = load_prompts(DEFAULT_PROMPTS)
    case = Case(question="Is there an effusion?", reference="Yes, on the right.", response="Yes, on the left.")
    first = prompts.request(case, "radiologist", None, prefill=True)
    system, user = first.messages[0][1], first.messages[1][1]
    assert system.startswith(prompts.roles["radiologist"]) and system.endswith(prompts.rubric)
    assert all(text in user for text in (case.question, case.reference, case.response))
    assert "$" not in user and first.prefill == '{"score": '
    follow = prompts.request(case, "clinician", Previous("radiologist", 7, "wrong side"), prefill=False)
    assert "7" in follow.messages[1][1] and "wrong side" in follow.messages[1][1] and follow.prefill == ""
    retry = prompts.retry(first, "invalid JSON: Expecting value")
    assert retry.messages[:-1] == first.messages[:-1] and len(retry.messages) == len(first.messages)
    assert retry.messages[-1][1].startswith(user) and "invalid JSON" in retry.messages[-1][1]


def test_prompt_file_placeholders_are_checked(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SCRIPT_PROMPTS.replace("Q<<$question>>", "Q<<$questoin>>", 1))
    with pytest.raises(PromptFileError, match="questoin"):
        load_prompts(path)
    path.write_text(SCRIPT_PROMPTS.replace("PREVIOUS<<$previous_score>>", ""))
    with pytest.raises(PromptFileError, match="previous_score"):
        load_prompts(path)


# ------------------------------------------------------------------------------------------- consensus

CASES = [Case(question="q", reference="ref", response=r) for r in ("r1", "r2", "r3")]


def test_consensus_at_once(prompts):
    a = ScriptedJudge("A", fixed({"r1": 7, "r2": 2, "r3": 10}))
    b = ScriptedJudge("B", lambda response, previous, retry: answer(previous), role="b")  # always agrees
    outcomes = run_consensus(CASES, [a, b], prompts, rounds=5, retries=2)
    assert [o.score for o in outcomes] == [7.0, 2.0, 10.0]
    assert all(o.agreed and o.rounds == 1 and len(o.turns) == 2 for o in outcomes)
    turns = json.loads(outcomes[0].transcript())
    assert turns[0]["shown"] is None and turns[1]["shown"] == {"judge": "A", "score": 7}
    # batched: each judge asked once, about every response at the same time
    assert a.calls == [3] and b.calls == [3]


def test_late_consensus(prompts):
    # A scores 8 fresh; B says 4; A, shown 4, comes round to 4: every judge's latest word is 4.
    a = ScriptedJudge("A", lambda response, previous, retry: answer(8 if previous is None else previous))
    b = ScriptedJudge("B", lambda response, previous, retry: answer(4), role="b")
    [outcome] = run_consensus(CASES[:1], [a, b], prompts, rounds=5, retries=2)
    assert outcome.agreed and outcome.score == 4.0 and outcome.rounds == 2
    assert [t.score for t in outcome.turns] == [8, 4, 4]
    assert [t.judge for t in outcome.turns] == ["A", "B", "A"]


def test_no_consensus_gives_the_mean_of_the_history(prompts):
    a = ScriptedJudge("A", lambda response, previous, retry: answer(2))
    b = ScriptedJudge("B", lambda response, previous, retry: answer(7), role="b")
    [outcome] = run_consensus(CASES[:1], [a, b], prompts, rounds=3, retries=2)
    assert not outcome.agreed and outcome.rounds == 3
    assert outcome.history == [2, 7, 2, 7, 2, 7]
    assert outcome.score == pytest.approx(4.5)


def test_three_judges_need_three_agreeing_turns(prompts):
    scores = iter([5, 6, 6, 6])
    judges = [ScriptedJudge(n, lambda response, previous, retry: answer(next(scores))) for n in "ABC"]
    [outcome] = run_consensus(CASES[:1], judges, prompts, rounds=5, retries=2)
    assert outcome.agreed and outcome.score == 6.0 and outcome.rounds == 2  # turns A B C | A
    assert [t.judge for t in outcome.turns] == ["A", "B", "C", "A"]


def test_malformed_answer_is_retried_then_recovered(prompts):
    def flaky(response, previous, retry):
        return answer(6) if retry else "I would say six out of ten"

    a = ScriptedJudge("A", flaky)
    b = ScriptedJudge("B", lambda response, previous, retry: answer(6), role="b")
    [outcome] = run_consensus(CASES[:1], [a, b], prompts, rounds=5, retries=2)
    assert outcome.agreed and outcome.score == 6.0
    first = outcome.turns[0]
    assert first.answers == ["I would say six out of ten", answer(6)] and len(first.errors) == 1
    assert a.calls == [1, 1]  # the retry is its own (batched) request


def test_missing_answers_are_recorded_never_invented(prompts):
    a = ScriptedJudge("A", fixed({"r1": 5, "r2": 5, "r3": 5}))
    broken = ScriptedJudge("B", lambda response, previous, retry: '{"score": "high"}', role="b")
    [outcome] = run_consensus(CASES[:1], [a, broken], prompts, rounds=2, retries=2)
    # B is missing every turn: no consensus is possible; the history holds only A's scores.
    assert [t.score for t in outcome.turns] == [5, None, 5, None]
    assert all(len(t.answers) == 3 and len(t.errors) == 3 for t in outcome.turns if t.judge == "B")
    assert not outcome.agreed and outcome.score == 5.0 and outcome.rounds == 2
    # After a missing turn the next judge is shown the latest valid score.
    assert outcome.turns[2].shown == Previous("A", 5, "scripted")

    nobody = [ScriptedJudge("A", lambda *_: "no"), ScriptedJudge("B", lambda *_: "no", role="b")]
    [empty] = run_consensus(CASES[:1], nobody, prompts, rounds=2, retries=1)
    assert empty.score is None and not empty.agreed and empty.history == []
    assert clinical_weights([empty.score, 3.0, 9.0], WEIGHTS)[0] == 1.0


# --------------------------------------------------------------------------------------------- weights


def test_weights_standardize_map_and_clip():
    scores = [2.0, 4.0, 6.0, 8.0, None]
    mean, std = 5.0, math.sqrt(5.0)
    z = standardize(scores)
    assert z[:4] == pytest.approx([(s - mean) / std for s in scores[:4]]) and z[4] is None
    w = clinical_weights(scores, WEIGHTS)
    sigma = math.sqrt(0.1)
    expected = [min(1.25, max(0.75, 1 + sigma * (s - mean) / std)) for s in scores[:4]]
    assert w[:4] == pytest.approx(expected)
    assert w[0] == 0.75 and w[3] == 1.25  # |z| = 1.34 > 0.79: clipped
    assert w[1] == pytest.approx(1 - sigma / math.sqrt(5)) and w[4] == 1.0  # missing -> mu
    assert sum(z[:4]) == pytest.approx(0.0)


def test_weights_degenerate_cases():
    assert clinical_weights([4.0, 4.0, 4.0], WEIGHTS) == [1.0, 1.0, 1.0]  # std 0 -> z 0 -> mu
    assert clinical_weights([7.0], WEIGHTS) == [1.0]
    assert clinical_weights([], WEIGHTS) == []
    custom = WeightConfig(mu=2.0, sigma=0.5, clip=(0.0, 10.0))
    assert clinical_weights([0.0, 10.0], custom) == pytest.approx([1.5, 2.5])


# ------------------------------------------------------------------------------ cache, resume, stage rows


class ScriptedBackend:
    """A backend that answers from a table, one answer at a time, and can die after `fail_after` answers."""

    def __init__(self, table: dict[str, int], fail_after: int | None = None, model: str = "scripted") -> None:
        self.table, self.fail_after, self.model = table, fail_after, model
        self.asked: list[JudgeRequest] = []

    def identity(self) -> dict:
        return {"backend": "scripted", "model": self.model}

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        for i, request in enumerate(requests):
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.asked.append(request)
            response, previous, _ = read_turn(request)
            yield i, answer(self.table[response] if previous is None else previous)


def judge_config(name: str, role: str) -> HFJudgeConfig:
    return HFJudgeConfig(name=name, role=role, backend="hf", model="scripted", prefill=False, batch_size=8,
                         max_new_tokens=48, temperature=0.0)


def score_config(judges) -> ScoreConfig:
    return parse_score_config({**DEFAULT_SECTION, "judges": [j.model_dump() for j in judges]})


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def ranked_rows(texts_per_row: Sequence[Sequence[str]]) -> list[dict]:
    return [
        {"id": f"e{i}", "dataset": "unit", "split": "train", "image": png(), "question": f"question {i}?",
         "answer": f"reference {i}", "answer_type": "open", "modality": "ct", "question_type": "presence",
         "context": [],
         "rejected": [{"text": t, "similarity": 0.9 - 0.1 * j, "level": j + 1, "logprob": -1.0 - j}
                      for j, t in enumerate(texts)]}
        for i, texts in enumerate(texts_per_row)
    ]


def panel(cache: ResponseCache, backend: ScriptedBackend, version: str = "test-1") -> list[CachedJudge]:
    return [CachedJudge(judge_config("A", "a"), backend, cache, version),
            CachedJudge(judge_config("B", "b"), backend, cache, version)]


def test_cache_key_covers_everything_that_determines_an_answer():
    request = JudgeRequest(messages=(("user", "hi"),))
    base = request_key({"backend": "hf", "model": "m"}, request, Generation(48, 0.0), 1)
    assert base == request_key({"backend": "hf", "model": "m"}, JudgeRequest(messages=(("user", "hi"),)), Generation(48, 0.0), 1)
    assert base != request_key({"backend": "hf", "model": "other"}, request, Generation(48, 0.0), 1)
    assert base != request_key({"backend": "openai", "model": "m"}, request, Generation(48, 0.0), 1)
    assert base != request_key({"backend": "hf", "model": "m"}, JudgeRequest(messages=(("user", "hi!"),)), Generation(48, 0.0), 1)
    assert base != request_key({"backend": "hf", "model": "m"}, JudgeRequest((("user", "hi"),), "{"), Generation(48, 0.0), 1)
    assert base != request_key({"backend": "hf", "model": "m"}, request, Generation(48, 0.7), 1)
    assert base != request_key({"backend": "hf", "model": "m"}, request, Generation(9, 0.0), 1)
    assert base != request_key({"backend": "hf", "model": "m"}, request, Generation(48, 0.0), 2)


def test_score_rows_writes_scored_schema(tmp_path, prompts):
    rows = ranked_rows([["r1", "r2"], [], ["r3"]])
    table = {"r1": 9, "r2": 1, "r3": 5}
    config = score_config((judge_config("A", "a"), judge_config("B", "b")))
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        judges = panel(cache, ScriptedBackend(table))
        result = score_rows(rows, judges, prompts, config)
    write_rows(result.rows, tmp_path / "scored.parquet", SCORED_SCHEMA)
    back = read_rows(tmp_path / "scored.parquet", SCORED_SCHEMA)
    assert [len(r["judgements"]) for r in back] == [2, 0, 1]
    assert [j["score"] for r in back for j in r["judgements"]] == [9.0, 1.0, 5.0]
    assert back[0]["rejected"] == rows[0]["rejected"] and back[0]["image"] == rows[0]["image"]
    weights = [j["weight"] for r in back for j in r["judgements"]]
    assert weights == pytest.approx(clinical_weights([9.0, 1.0, 5.0], WEIGHTS))
    assert weights[0] > weights[2] > weights[1]  # more clinically relevant -> heavier
    transcript = json.loads(back[0]["judgements"][0]["transcript"])
    assert [t["judge"] for t in transcript] == ["A", "B"] and transcript[0]["answers"] == [answer(9)]


def test_interrupted_run_resumes_from_the_cache_and_asks_nothing_twice(tmp_path, prompts):
    texts = [[f"resp{i}-{j}" for j in range(3)] for i in range(4)]  # 12 responses, 24 answers in all
    table = {t: (i * 3 + j) % 11 for i, row in enumerate(texts) for j, t in enumerate(row)}
    rows = ranked_rows(texts)
    config = score_config((judge_config("A", "a"), judge_config("B", "b")))
    cache_path = tmp_path / "cache.sqlite"

    dying = ScriptedBackend(table, fail_after=17)  # all 12 first answers, then 5 of the 12 second ones
    with ResponseCache(cache_path) as cache, pytest.raises(KeyboardInterrupt):
        score_rows(rows, panel(cache, dying), prompts, config)
    assert len(dying.asked) == 17

    counting = ScriptedBackend(table)
    with ResponseCache(cache_path) as cache:
        assert len(cache) == 17  # every answer received before the kill is on disk
        judges = panel(cache, counting)
        result = score_rows(rows, judges, prompts, config)
    first_keys = {json.dumps(r.as_dicts()) for r in dying.asked}
    again = [r for r in counting.asked if json.dumps(r.as_dicts()) in first_keys]
    assert again == [] and len(counting.asked) == 24 - 17
    metrics = score_metrics(result.outcomes, result.weights, config, entries=len(rows),
                            unique=result.unique, cache_stats={j.name: j.stats for j in judges}, request_retries={})
    assert metrics["cache"]["hits"] == 17 and metrics["cache"]["asked"] == 7
    assert [o.score for o in result.outcomes] == [float(table[t]) for row in texts for t in row]
    assert metrics["agreement_rate"] == 1.0 and metrics["rounds_histogram"]["1"] == 12

    # a third run is answered entirely from the cache
    idle = ScriptedBackend(table, fail_after=0)
    with ResponseCache(cache_path) as cache:
        judges = panel(cache, idle)
        again_result = score_rows(rows, judges, prompts, config)
    assert idle.asked == [] and sum(j.stats.hits for j in judges) == 24
    assert [j["transcript"] for r in again_result.rows for j in r["judgements"]] == [
        j["transcript"] for r in result.rows for j in r["judgements"]
    ]


KILL_SCRIPT = """
import json, os, re, signal, sys
from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import CachedJudge
from pipeline.judges.panel import HFJudgeConfig
from pipeline.judges.prompts import Case, load_prompts
from pipeline.judges.consensus import run_consensus

class Dying:
    def __init__(self): self.n = 0
    def identity(self): return {"backend": "scripted", "model": "scripted"}
    def complete(self, requests, generation):
        for i, r in enumerate(requests):
            if self.n == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally, no flush
            self.n += 1
            yield i, json.dumps({"score": self.n % 11, "reason": "r"})

prompts = load_prompts(sys.argv[1])
backend = Dying()
with ResponseCache(sys.argv[2]) as cache:
    judges = [CachedJudge(HFJudgeConfig(name=n, role=n.lower(), backend="hf", model="scripted", prefill=False,
                                        batch_size=8, max_new_tokens=48, temperature=0.0), backend, cache, "v")
              for n in "AB"]
    run_consensus([Case("q", "ref", f"resp{i}") for i in range(10)], judges, prompts, rounds=5, retries=2)
"""


def test_a_killed_process_loses_no_answer_it_received(tmp_path):
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "p.yaml").write_text(SCRIPT_PROMPTS)
    env = {**os.environ, "PYTHONPATH": str(root)}
    cache_path = tmp_path / "cache.sqlite"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "p.yaml"), str(cache_path), "13"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    with ResponseCache(cache_path) as cache:
        assert len(cache) == 13


def test_a_new_prompt_version_asks_again(tmp_path, prompts):
    rows = ranked_rows([["r1"]])
    config = score_config((judge_config("A", "a"), judge_config("B", "b")))
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        first = ScriptedBackend({"r1": 3})
        score_rows(rows, panel(cache, first, "v1"), prompts, config)
        second = ScriptedBackend({"r1": 3})
        score_rows(rows, panel(cache, second, "v2"), prompts, config)
    assert len(first.asked) == len(second.asked) == 2


def test_identical_responses_are_judged_once(tmp_path, prompts):
    rows = ranked_rows([["same", "other"], ["same"]])
    rows[1]["question"], rows[1]["answer"] = rows[0]["question"], rows[0]["answer"]
    config = score_config((judge_config("A", "a"), judge_config("B", "b")))
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        backend = ScriptedBackend({"same": 4, "other": 8})
        judges = panel(cache, backend)
        result = score_rows(rows, judges, prompts, config)
    assert result.unique == 2 and len(backend.asked) == 4
    assert [o.score for o in result.outcomes] == [4.0, 8.0, 4.0]
    metrics = score_metrics(result.outcomes, result.weights, config, entries=2, unique=result.unique,
                            cache_stats={j.name: j.stats for j in judges}, request_retries={})
    assert metrics["responses"] == 3 and metrics["rounds_histogram"]["1"] == 3
    assert metrics["judges"]["A"]["turns"] == 2


def test_identical_requests_in_a_batch_are_asked_once(tmp_path):
    request = JudgeRequest(messages=(("user", "RESPONSE<<x>>"),))
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        backend = ScriptedBackend({"x": 5})
        judge = CachedJudge(judge_config("A", "a"), backend, cache, "v")
        assert judge.ask([request, request]) == [answer(5), answer(5)]
    assert len(backend.asked) == 1 and judge.stats.deduplicated == 1 and judge.stats.asked == 1


def test_ranked_fixture_matches_the_input_schema(tmp_path):
    write_rows(ranked_rows([["a", "b"]]), tmp_path / "ranked.parquet", RANKED_SCHEMA)
    assert read_rows(tmp_path / "ranked.parquet", RANKED_SCHEMA)[0]["rejected"][1]["text"] == "b"


# ------------------------------------------------------------------------------------------ hf backend


def tiny_judge_model(texts: Sequence[str]):
    """A random 2-layer Llama and a word-level chat tokenizer: fast, and no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.tiny_tokenizer import build_tiny_tokenizer

    # transformers' stop-string matcher tokenizes "abcdef" to learn the vocabulary's prefixes
    tokenizer = build_tiny_tokenizer(list(texts) + ['{ " score " : 7 , } 0 1 2 3'], extra_words=["abcdef"])
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_hf_backend_batches_and_is_deterministic():
    from pipeline.judges.backends.hf import HFBackend, LoadedModel

    prompts = load_prompts(DEFAULT_PROMPTS)
    cases = [Case("is there a mass ?", "yes", "no"), Case("which side ?", "left", "right , a much longer answer"),
             Case("how many ?", "2", "3")]
    requests = [prompts.request(c, "radiologist", None, prefill=True) for c in cases]
    model, tokenizer = tiny_judge_model([content for r in requests for _, content in r.messages])
    loaded = LoadedModel(name="tiny", model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                         dtype=torch.float32, weights="digest")
    backend = HFBackend(loaded, batch_size=3)
    generation = Generation(max_new_tokens=6, temperature=0.0)
    first = dict(backend.complete(requests, generation))
    assert sorted(first) == [0, 1, 2] and all(isinstance(t, str) for t in first.values())
    assert first == dict(backend.complete(requests, generation))  # greedy: same answers again
    # The shared-prefix KV cache (the system message, run once per batch) changes no answer,
    # and neither does the batch composition.
    assert first == dict(HFBackend(loaded, batch_size=3, prefix_cache=False).complete(requests, generation))
    assert first == dict(HFBackend(loaded, batch_size=1).complete(requests, generation))
    identity = backend.identity()
    assert {k: identity[k] for k in ("backend", "model", "dtype", "weights")} == {
        "backend": "hf", "model": "tiny", "dtype": "float32", "weights": "digest"}
    assert len(identity["code"]) == 64  # the backend's source: an edit never reuses old answers
    assert backend.render(requests[0]).endswith(prompts.prefill)


def test_stage_with_a_local_hf_panel_records_what_the_judges_said(tmp_path):
    """End to end through `score_panel` with an `hf` panel loaded from a folder. A random model
    answers garbage: every score must then come from a parsed answer, or be missing — never made up."""
    from pipeline.judges.scoring import score_panel

    prompts = load_prompts(DEFAULT_PROMPTS)
    rows = ranked_rows([["no", "left"], ["large"]])
    texts = [prompts.rubric, *prompts.roles.values(), prompts.first_turn.template, prompts.followup_turn.template,
             prompts.retry_turn.template] + [f"{r['question']} {r['answer']}" for r in rows] + ["no left large"]
    model, tokenizer = tiny_judge_model(texts)
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    write_rows(rows, tmp_path / "ranked.parquet", RANKED_SCHEMA)
    judge = {"backend": "hf", "model": str(tmp_path / "judge"), "prefill": True, "max_new_tokens": 8,
             "batch_size": 32, "temperature": 0.0}
    config = parse_score_config({
        **DEFAULT_SECTION,
        "judges": [{"name": "radiologist", "role": "radiologist", **judge},
                   {"name": "clinician", "role": "clinician", **judge}],
        "rounds": 2, "retries": 1, "prompts": str(DEFAULT_PROMPTS), "max_unscored": 1.0,  # it answers garbage
    })
    back, metrics, _timings = score_panel(config, read_rows(tmp_path / "ranked.parquet", RANKED_SCHEMA),
                                tmp_path / "cache.sqlite", progress=False)
    judgements = [j for r in back for j in r["judgements"]]
    assert len(judgements) == 3 and metrics["responses"] == 3
    for j in judgements:
        turns = json.loads(j["transcript"])
        assert turns and all(len(t["answers"]) == len(t["errors"]) + (t["score"] is not None) for t in turns)
        for t in turns:  # every recorded score is what the last answer of that turn says
            if t["score"] is not None:
                assert parse_answer(t["answers"][-1]).score == t["score"]
        history = [t["score"] for t in turns if t["score"] is not None]
        if not history:
            assert j["score"] is None and j["weight"] == 1.0
        elif j["agreed"]:
            assert j["score"] == history[-1]
        else:
            assert j["score"] == pytest.approx(sum(history) / len(history))
    assert metrics["cache"]["asked"] > 0
