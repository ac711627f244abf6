"""CheXPO counterfactual rationales: `score.rationales` (written by a judge, with provenance, through
the response cache, never invented) and `train.rationales` (the augmented texts training uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.errors import DataError, ParamsError
from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import CachedJudge, JudgeError, JudgeRequest, request_key
from pipeline.judges.panel import (
    Generation,
    HFJudgeConfig,
    OpenAIJudgeConfig,
    PanelConfigError,
    parse_score_config,
)
from pipeline.judges.prompts import PromptFileError, load_prompts
from pipeline.judges.rationales import MalformedRationale, add_rationales, clean_rationale, rationale_judge
from pipeline.judges.scoring import check_panel, score_panel, score_rows
from pipeline.params import load_params, project_config, project_params_path
from pipeline.schema import RANKED_SCHEMA, SCORED_SCHEMA, read_rows, write_rows
from pipeline.stages.score import app
from pipeline.training.preference import PreferenceConfig, PreferenceTrainer, build_entries
from tests.test_judges_openai import (
    ENV,
    KEY,
    SCRIPT_PROMPTS,
    ChatServer,
    cache_path,
    ranked_rows,
    section,
    stage_args,
)

# The scripted prompt file of the judge tests plus a `rationales:` section. Its turns carry
# RESPONSE<<answer::why>>, which the loopback server reads like a verdict request's RESPONSE<<...>>.
PROMPTS = SCRIPT_PROMPTS + """\
rationales:
  version: r-test-1
  prefill: 'BECAUSE $answer:'
  system: You explain answers.
  rationale_turn: 'RESPONSE<<$answer::why>> Q<<$question>>'
  counterfactual_turn: 'RESPONSE<<$answer::why>> Q<<$question>> NOT<<$reference>>'
"""
DEFAULT_SCORE = load_params(project_params_path())["score"]


def own_answer(request: JudgeRequest) -> str:
    """The answer a scripted rationale request argues for."""
    user = request.messages[-1][1]
    return user.split("RESPONSE<<", 1)[1].split(">>", 1)[0].removesuffix("::why")


class RationaleServer(ChatServer):
    """The loopback chat server; rationale requests get prose (or, per answer, an empty or JSON reply)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.empty: set[str] = set()
        self.json: set[str] = set()

    def verdict(self, model: str, user: str, response: str) -> str:
        if not response.endswith("::why"):
            return ChatServer.verdict(model, user, response)
        answer = response.removesuffix("::why")
        if answer in self.empty:
            return "  \n "
        if answer in self.json:
            return '{"score": 3, "reason": "a verdict, not a rationale"}'
        return f"{model} finds {answer} in the image. And a fragment cut by the tok"

    def rationale_requests(self) -> list[dict]:
        return [r for r in self.requests if "::why>>" in r["messages"][-1]["content"]]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    (tmp_path / "prompts.yaml").write_text(PROMPTS)
    write_rows(ranked_rows([["r1", "r2"], ["r3"], ["r4"]]), tmp_path / "ranked.parquet", RANKED_SCHEMA)
    return tmp_path


def run_stage(tmp: Path, server: ChatServer, enabled: bool = True, name: str = "scored.parquet") -> dict:
    judge = {"structured_output": "response_format"}  # verdicts constrained; rationales must not be
    raw = section(server.url, tmp, judge, rationales={"enabled": enabled, "judge": "A", "max_new_tokens": 24})
    (tmp / "params.yaml").write_text(yaml.safe_dump({"score": raw}))
    result = CliRunner().invoke(app, stage_args(tmp, name, "reports/score.json"))
    assert result.exit_code == 0, result.output
    return {"rows": read_rows(tmp / name, SCORED_SCHEMA), "output": result.output,
            "report": json.loads((tmp / "reports" / "score.json").read_text()),
            "timings": json.loads((tmp / "timings.json").read_text())}


def texts(rows: list[dict]) -> list:
    """Per row: (rationale text, [counterfactual texts]), None where there is none."""
    return [((r["rationale"] or {}).get("text"), [c and c["text"] for c in (r["counterfactuals"] or [])])
            for r in rows]


# ------------------------------------------------------------------------------------- the stage


def test_rationales_are_written_with_provenance_and_a_rerun_asks_nothing(files):
    tmp = files
    with RationaleServer() as server:
        first = run_stage(tmp, server)
        asked = server.rationale_requests()
    # Prose, cut after its last full sentence; the openai backend takes no prefill.
    assert texts(first["rows"]) == [
        ("judge-a finds reference 0 in the image.", ["judge-a finds r1 in the image.", "judge-a finds r2 in the image."]),
        ("judge-a finds reference 1 in the image.", ["judge-a finds r3 in the image."]),
        ("judge-a finds reference 2 in the image.", ["judge-a finds r4 in the image."]),
    ]
    # The judge's backend, with the rationales' own decoding: no verdict schema, their length cap.
    assert len(asked) == 7 and {r["model"] for r in asked} == {"judge-a"}
    assert all("response_format" not in r and r["max_tokens"] == 24 for r in asked)
    verdicts = [r for r in server.requests if r not in asked]
    assert verdicts and all("response_format" in r for r in verdicts)

    # Provenance: the judge, the prompt version, and the key its answer is cached under.
    with ResponseCache(cache_path(tmp)) as cache:
        for row in first["rows"]:
            for value in [row["rationale"], *row["counterfactuals"]]:
                assert value["judge"] == "A" and value["prompt_version"] == "r-test-1"
                stored = cache.get_many([value["cache_key"]])[value["cache_key"]]
                assert stored.startswith(value["text"])  # the text is what the judge said, cut
    report = first["report"]["rationales"]
    assert report["rationale"] == {"requested": 3, "written": 3, "failed": 0}
    assert report["counterfactual"] == {"requested": 4, "written": 4, "failed": 0}
    assert report["failed_by_cause"] == {"backend": 0, "empty": 0, "malformed": 0} and report["backend_error"] is None
    assert "cache" not in report  # cache use depends on history: in the timings file
    assert first["timings"]["rationale_cache"] == {"hits": 0, "asked": 7, "hit_rate": 0.0, "deduplicated": 0}
    assert "rationales 3/3, counterfactuals 4/4 written" in first["output"]

    with RationaleServer() as server:  # a rerun: every verdict and rationale comes from the cache
        second = run_stage(tmp, server, name="again.parquet")
        assert server.requests == []
    assert second["rows"] == first["rows"] and second["report"] == first["report"]
    assert second["timings"]["rationale_cache"] == {"hits": 7, "asked": 0, "hit_rate": 1.0, "deduplicated": 0}


def test_a_failed_request_is_counted_not_filled_in_and_asked_again_later(files):
    tmp = files
    with RationaleServer() as server:
        server.always_fail = {"r2::why"}  # HTTP 500 on every retry: the request fails for good
        server.empty, server.json = {"r4"}, {"reference 1"}
        first = run_stage(tmp, server)
    assert texts(first["rows"]) == [
        ("judge-a finds reference 0 in the image.", ["judge-a finds r1 in the image.", None]),
        (None, ["judge-a finds r3 in the image."]),
        ("judge-a finds reference 2 in the image.", [None]),
    ]
    report = first["report"]["rationales"]
    assert report["rationale"] == {"requested": 3, "written": 2, "failed": 1}
    assert report["counterfactual"] == {"requested": 4, "written": 2, "failed": 2}
    assert report["failed_by_cause"] == {"backend": 1, "empty": 1, "malformed": 1}
    assert "HTTP 500" in report["backend_error"]
    assert first["report"]["status"] == "ok"  # a missing rationale does not fail the stage

    # The failed request was not cached: a rerun asks it, and only it. The empty and the JSON
    # answers are what the judge said: cached, and still no rationale.
    with RationaleServer() as server:
        server.empty, server.json = {"r4"}, {"reference 1"}
        second = run_stage(tmp, server, name="again.parquet")
        assert [own_answer_of(r) for r in server.requests] == ["r2"]
    assert texts(second["rows"])[0][1] == ["judge-a finds r1 in the image.", "judge-a finds r2 in the image."]
    assert texts(second["rows"])[1:] == texts(first["rows"])[1:]
    assert second["report"]["rationales"]["failed_by_cause"] == {"backend": 0, "empty": 1, "malformed": 1}
    assert second["timings"]["rationale_cache"]["asked"] == 1


def own_answer_of(body: dict) -> str:
    return body["messages"][-1]["content"].split("RESPONSE<<", 1)[1].split("::why>>", 1)[0]


def test_a_server_refusing_every_rationale_request_leaves_them_all_null(files):
    tmp = files
    with RationaleServer() as server:
        off = run_stage(tmp, server, enabled=False)  # the verdicts, now in the cache
    assert [(r["rationale"], r["counterfactuals"]) for r in off["rows"]] == [(None, None)] * 3
    assert off["report"]["rationales"] == {"enabled": False} and "rationale_cache" not in off["timings"]

    with RationaleServer() as server:
        server.chat_error = (400, b'{"error": {"message": "no such thing"}}')
        on = run_stage(tmp, server)
        sent = len(server.requests)
    report = on["report"]["rationales"]
    assert texts(on["rows"]) == [(None, [None, None]), (None, [None]), (None, [None])]
    assert report["failed_by_cause"] == {"backend": 7, "empty": 0, "malformed": 0}
    assert "HTTP 400" in report["backend_error"]
    assert sent < 7  # three 400s in a row stop the turn (request_retry.max_consecutive_failures)
    assert [j["score"] for r in on["rows"] for j in r["judgements"]] == [j["score"] for r in off["rows"]
                                                                          for j in r["judgements"]]


# ------------------------------------------------------------------------------- library, scripted


class ScriptedBackend:
    """Verdicts: always 5. Rationales: from `script` (answer -> reply); JudgeError for `fail`."""

    def __init__(self, script: dict[str, str] | None = None, fail: set[str] | None = None) -> None:
        self.script, self.fail = script or {}, fail or set()
        self.asked: list[JudgeRequest] = []
        self.calls: list[int] = []

    def identity(self) -> dict:
        return {"backend": "scripted", "model": "scripted"}

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        self.calls.append(len(requests))
        failed = 0
        for i, request in enumerate(requests):
            if "::why>>" not in request.messages[-1][1]:
                yield i, json.dumps({"score": 5, "reason": "r"})
                continue
            answer = own_answer(request)
            if answer in self.fail:
                failed += 1
                continue
            self.asked.append(request)
            yield i, self.script.get(answer, f" {answer} is seen.")
        if failed:  # as the openai backend does: the answers first, then the error
            raise JudgeError(f"{failed} request(s) failed")


def hf_judge(name: str, role: str, prefill: bool = False) -> HFJudgeConfig:
    return HFJudgeConfig(name=name, role=role, backend="hf", model="scripted", prefill=prefill, batch_size=8,
                         max_new_tokens=48, temperature=0.0)


def writer(cache: ResponseCache, backend, prompts, prefill: bool = False, max_new_tokens: int = 16) -> CachedJudge:
    config = parse_score_config({**DEFAULT_SCORE, "judges": [hf_judge("A", "a", prefill).model_dump()],
                                 "rationales": {"enabled": True, "judge": "A", "max_new_tokens": max_new_tokens}})
    panel_judge = CachedJudge(config.judges[0], backend, cache, prompts.version)
    return rationale_judge(panel_judge, cache, prompts.rationales, config.rationales)


@pytest.fixture
def prompts(tmp_path):
    (tmp_path / "prompts.yaml").write_text(PROMPTS)
    return load_prompts(tmp_path / "prompts.yaml")


def test_one_batch_shared_requests_once_prefill_kept_and_cache_hits_counted(tmp_path, prompts):
    rows = ranked_rows([["no", "maybe"], ["no"], ["yes"]])
    rows[1]["question"], rows[1]["answer"] = rows[0]["question"], rows[0]["answer"]  # a duplicate entry
    backend = ScriptedBackend({"maybe": "    "})  # continuation of the prefill: nothing of its own
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        judge = writer(cache, backend, prompts, prefill=True)
        result = add_rationales(rows, judge, prompts.rationales)
    assert backend.calls == [5]  # one call (hf batches it); entry 1 repeats entry 0's two requests
    assert judge.stats.asked == 5 and judge.stats.deduplicated == 2
    assert texts(result.rows) == [
        ("BECAUSE reference 0: reference 0 is seen.", ["BECAUSE no: no is seen.", None]),
        ("BECAUSE reference 0: reference 0 is seen.", ["BECAUSE no: no is seen."]),
        ("BECAUSE reference 2: reference 2 is seen.", ["BECAUSE yes: yes is seen."]),
    ]
    assert result.metrics["failed_by_cause"] == {"backend": 0, "empty": 1, "malformed": 0}
    assert result.metrics["unique_requests"] == 5
    key = result.rows[0]["rationale"]["cache_key"]
    assert key == request_key(backend.identity(), prompts.rationales.rationale("question 0?", "reference 0", True),
                              judge.generation, {"rationales": "r-test-1"})

    with ResponseCache(tmp_path / "c.sqlite") as cache:  # again: from the cache, the same rows
        idle = ScriptedBackend(fail={"reference 0", "no", "maybe", "reference 2", "yes"})
        judge = writer(cache, idle, prompts, prefill=True)
        again = add_rationales(rows, judge, prompts.rationales)
    assert idle.calls == [] and judge.stats.hits == 7 and again.rows == result.rows


def test_a_failed_request_leaves_null_and_is_not_cached(tmp_path, prompts):
    rows = ranked_rows([["no", "maybe"]])
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        result = add_rationales(rows, writer(cache, ScriptedBackend(fail={"maybe"}), prompts), prompts.rationales)
        assert texts(result.rows) == [("reference 0 is seen.", ["no is seen.", None])]
        assert result.metrics["failed_by_cause"]["backend"] == 1 and "1 request(s) failed" in \
            result.metrics["backend_error"]
        healthy = ScriptedBackend()
        again = add_rationales(rows, writer(cache, healthy, prompts), prompts.rationales)
    assert [own_answer(r) for r in healthy.asked] == ["maybe"]
    assert texts(again.rows) == [("reference 0 is seen.", ["no is seen.", "maybe is seen."])]


def test_the_cache_key_covers_prompt_version_model_and_decoding(tmp_path, prompts):
    request = prompts.rationales.rationale("q?", "yes", False)
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        base = writer(cache, ScriptedBackend(), prompts)
        assert base.generation.max_new_tokens == 16 and base.generation.temperature == 0.0
        assert writer(cache, ScriptedBackend(), prompts).key(request) == base.key(request)
        assert writer(cache, ScriptedBackend(), prompts, max_new_tokens=17).key(request) != base.key(request)
        bumped = load_prompts_text(tmp_path, PROMPTS.replace("r-test-1", "r-test-2"))
        assert writer(cache, ScriptedBackend(), bumped).key(request) != base.key(request)
        other = ScriptedBackend()
        other.identity = lambda: {"backend": "scripted", "model": "other"}
        assert writer(cache, other, prompts).key(request) != base.key(request)
        # A verdict request with the same judge has another key (the prompt version differs too).
        assert CachedJudge(base.config, base.backend, cache, prompts.version).key(request) != base.key(request)
    # An openai judge with a verdict schema writes rationales without it.
    remote = OpenAIJudgeConfig(name="A", role="a", backend="openai", model="m", base_url="http://h/v1",
                               api_key_env="X", timeout_s=1.0, max_concurrency=1, max_new_tokens=64,
                               temperature=0.0, extra_body={}, preflight=False,
                               structured_output="response_format", sampling_fields={})
    judge = rationale_judge(CachedJudge(remote, ScriptedBackend(), None, 1), None, prompts.rationales,
                            parse_score_config({**DEFAULT_SCORE, "judges": [remote.model_dump()],
                                                "rationales": {"enabled": True, "judge": "A",
                                                               "max_new_tokens": 9}}).rationales)
    assert judge.generation.structured_output == "none" and judge.generation.max_new_tokens == 9


def load_prompts_text(tmp_path: Path, text: str):
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return load_prompts(path)


@pytest.mark.parametrize(("answer", "start", "expected"), [
    (" the left lung is clear. It is", "BECAUSE no:", "BECAUSE no: the left lung is clear."),
    ("The heart is enlarged", "", "The heart is enlarged"),  # no sentence end: kept as it is
    ("  The heart\n is enlarged.\n\nSecond paragraph.", "", "The heart is enlarged."),
    ("A mass is seen. Twice.", "", "A mass is seen."),  # the first sentence: one was asked for
    ("There is 1.5 cm of fluid here. More.", "", "There is 1.5 cm of fluid here."),  # a decimal point ends nothing
])
def test_clean_rationale_keeps_what_the_judge_said(answer, start, expected):
    assert clean_rationale(start + answer, start) == expected


@pytest.mark.parametrize(("answer", "cause"), [
    ("", "empty"), (" \n ", "empty"), ("Yes.", "malformed"), ('{"score": 3, "reason": "r"}', "malformed"),
    ("```\ncode\n```", "malformed"), ("\n\nThe heart is enlarged.", "malformed"),
])
def test_clean_rationale_rejects_empty_and_malformed(answer, cause):
    start = "BECAUSE yes:" if answer.startswith("\n\n") else ""
    with pytest.raises(MalformedRationale) as bad:
        clean_rationale(start + answer, start)
    assert bad.value.cause == cause


def test_hf_judge_writes_only_what_it_said(tmp_path):
    """A random tiny hf model through `score_panel`: every written text comes from its cached
    answer under the recorded key; the rest is null and counted."""
    from tests.test_judges import DEFAULT_PROMPTS, tiny_judge_model

    prompts = load_prompts(DEFAULT_PROMPTS)
    rows = ranked_rows([["no", "left"], ["large"]])
    words = [prompts.rationales.system, prompts.rationales.rationale_turn.template, prompts.rubric,
             *prompts.roles.values(), prompts.first_turn.template, prompts.followup_turn.template,
             prompts.retry_turn.template, "The answer is because . question reference 0 1 no left large"]
    model, tokenizer = tiny_judge_model(words)
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = {"backend": "hf", "model": str(tmp_path / "judge"), "prefill": True, "max_new_tokens": 6,
             "batch_size": 4, "temperature": 0.0}
    config = parse_score_config({
        **DEFAULT_SCORE, "judges": [{"name": "radiologist", "role": "radiologist", **judge}],
        "rounds": 1, "retries": 0, "prompts": str(DEFAULT_PROMPTS), "max_unscored": 1.0,
        "rationales": {"enabled": True, "judge": "radiologist", "max_new_tokens": 8},
    })
    scored, metrics, timings = score_panel(config, rows, tmp_path / "cache.sqlite", progress=False)
    report = metrics["rationales"]
    assert report["rationale"]["requested"] == 2 and report["counterfactual"]["requested"] == 3
    written = [v for r in scored for v in [r["rationale"], *r["counterfactuals"]] if v is not None]
    assert len(written) == report["rationale"]["written"] + report["counterfactual"]["written"]
    assert sum(report["failed_by_cause"].values()) == 5 - len(written)
    assert timings["rationale_cache"]["asked"] == 5
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        for value in written:
            start = value["text"][: len("because")]
            assert start == "because"  # the prefill: the text continues the answer it argues for
            continuation = cache.get_many([value["cache_key"]])[value["cache_key"]]
            assert clean_rationale(start + continuation, start) == value["text"]


# --------------------------------------------------------------------------------------- config


def test_config_checks_the_judge_and_the_prompt_file(tmp_path):
    on = {"enabled": True, "judge": "nobody", "max_new_tokens": 8}
    with pytest.raises(ParamsError, match="score.rationales.judge 'nobody' is not a judge of the panel"):
        parse_score_config({**DEFAULT_SCORE, "rationales": on})
    parse_score_config({**DEFAULT_SCORE, "rationales": {**on, "enabled": False}})  # unused while off
    with pytest.raises(ParamsError, match="unknown key `score.rationales.enable`"):
        parse_score_config({**DEFAULT_SCORE, "rationales": {"enable": True, "judge": "radiologist",
                                                             "max_new_tokens": 8}})
    config = parse_score_config({**DEFAULT_SCORE, "judges": [hf_judge("A", "a").model_dump()],
                                 "rationales": {**on, "judge": "A"}})
    with pytest.raises(PanelConfigError, match="has no `rationales:` section"):
        check_panel(config, load_prompts_text(tmp_path, SCRIPT_PROMPTS))
    check_panel(config, load_prompts_text(tmp_path, PROMPTS))
    with pytest.raises(PromptFileError, match="rationale_turn must use placeholder"):
        load_prompts_text(tmp_path, PROMPTS.replace("RESPONSE<<$answer::why>> Q<<$question>>'\n",
                                                    "Q<<$question>>'\n", 1))
    with pytest.raises(PromptFileError, match=r"prefill uses unknown placeholder\(s\) \['reference'\]"):
        load_prompts_text(tmp_path, PROMPTS.replace("BECAUSE $answer:", "BECAUSE $reference:"))


def test_disabled_rationales_are_null_columns(tmp_path, prompts):
    rows = ranked_rows([["r1"], []])
    config = parse_score_config({**DEFAULT_SCORE, "judges": [hf_judge("A", "a").model_dump()]})
    assert not config.rationales.enabled  # the project's default
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        result = score_rows(rows, [CachedJudge(config.judges[0], ScriptedBackend(), cache, prompts.version)],
                            prompts, config)
    write_rows(result.rows, tmp_path / "scored.parquet", SCORED_SCHEMA)
    back = read_rows(tmp_path / "scored.parquet", SCORED_SCHEMA)
    assert [(r["rationale"], r["counterfactuals"]) for r in back] == [(None, None), (None, None)]


# ------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vlm():
    from tests.test_preference import tiny

    return tiny()


def scored(n: int = 4) -> list[dict]:
    from tests.test_preference import scored_rows

    rows = scored_rows(n)
    for i, row in enumerate(rows):
        row["rationale"] = {"text": f"why {row['answer']} {i}.", "judge": "A", "prompt_version": "v", "cache_key": "k"}
        row["counterfactuals"] = [{"text": f"for {r['text']} {i}.", "judge": "A", "prompt_version": "v",
                                   "cache_key": "k"} for r in row["rejected"]]
    return rows


def tokenized(vlm, rows, cfg) -> tuple[list, list[str]]:
    """build_entries, and every text it tokenized as an answer, in order."""
    seen: list[str] = []
    original = vlm.answer_ids

    def spy(text: str):
        seen.append(text)
        return original(text)

    vlm.answer_ids = spy
    try:
        return build_entries(vlm, rows, cfg), seen
    finally:
        del vlm.answer_ids


def config(**overrides) -> PreferenceConfig:
    values = dict(batch_size=4, epochs=1, lr=5e-3, warmup_fraction=0.0, evaluate_after=False)
    return project_config(PreferenceConfig, "train", **{**values, **overrides})


def test_train_rationales_builds_augmented_texts_and_falls_back_per_entry(vlm):
    rows = scored(4)  # entries 0 and 2 have three dispreferred answers, 1 and 3 two
    rows[0]["counterfactuals"][2] = None  # beyond max_rejected 2: not used, so entry 0 stays augmented
    rows[2]["counterfactuals"][0] = None  # a kept one missing: entry 2 falls back to the plain texts
    rows[3]["rationale"] = None  # no rationale: entry 3 too
    entries, seen = tokenized(vlm, rows, config(rationales=True, max_rejected=2))
    answer, rejected = rows[0]["answer"], [r["text"] for r in rows[0]["rejected"]]
    assert seen[:3] == [f"{answer} why {answer} 0.", f"{rejected[0]} for {rejected[0]} 0.",
                        f"{rejected[1]} for {rejected[1]} 0."]
    assert seen[3] == f"{rows[1]['answer']} why {rows[1]['answer']} 1."
    assert seen[6:9] == [rows[2]["answer"], *(r["text"] for r in rows[2]["rejected"][:2])]
    assert seen[9:] == [rows[3]["answer"], *(r["text"] for r in rows[3]["rejected"][:2])]
    assert [e.augmented for e in entries] == [True, True, False, False]
    assert entries[0].chosen == vlm.answer_ids(seen[0]) and entries[0].rejected[1] == vlm.answer_ids(seen[2])

    plain, seen = tokenized(vlm, rows, config(rationales=False, max_rejected=2))  # off: the answers only
    assert seen[:3] == [rows[0]["answer"], *(r["text"] for r in rows[0]["rejected"][:2])]
    assert not any(e.augmented for e in plain)
    # DPO keeps only the top-ranked dispreferred: entry 2's missing first counterfactual matters, entry 1's third not
    dpo, _ = tokenized(vlm, rows, config(rationales=True, loss="dpo"))
    assert [e.augmented for e in dpo] == [True, True, False, False]


def test_train_rationales_without_any_rationale_is_a_clear_error(vlm):
    from tests.test_preference import scored_rows

    rows = scored_rows(2)  # as `score` writes them with score.rationales off: null columns
    for row in rows:
        row["rationale"], row["counterfactuals"] = None, None
    with pytest.raises(DataError, match="set score.rationales.enabled: true and rerun `score`"):
        build_entries(vlm, rows, config(rationales=True))
    build_entries(vlm, rows, config(rationales=False))


def test_train_stage_without_rationales_fails_before_loading_a_model(tmp_path):
    from pipeline.stages.train import app as train_app
    from tests.test_preference import scored_rows

    write_rows(scored_rows(2), tmp_path / "scored.parquet", SCORED_SCHEMA)  # null rationale columns
    (tmp_path / "empty-model").mkdir()  # not a model: the rationale check must come first
    train = {**load_params(project_params_path())["train"], "rationales": True}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    result = CliRunner().invoke(train_app, [
        "--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "scored.parquet"),
        "--model", str(tmp_path / "empty-model"), "--output", str(tmp_path / "aligned"),
        "--metrics", str(tmp_path / "train.json"), "--live", str(tmp_path / "live"),
        "--work-dir", str(tmp_path / "work"), "--timings", str(tmp_path / "timings.json"),
    ])
    assert isinstance(result.exception, DataError), result.output  # the stage prints it as `error: ...`, exit 1
    assert "train.rationales is true but the scored input has no rationales" in str(result.exception)
    assert "set score.rationales.enabled: true" in str(result.exception)


def test_train_report_counts_augmented_and_plain_entries():
    from tests.test_preference import tiny

    rows = scored(4)
    rows[3]["rationale"] = None
    torch.manual_seed(0)
    summary = PreferenceTrainer(tiny(), rows, config(rationales=True)).train()
    assert summary["rationale_entries"] == 3 and summary["plain_entries"] == 1
