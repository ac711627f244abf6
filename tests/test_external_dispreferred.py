"""`sample.source: external` (HSCR Table 3's baseline): wrong answers written by another model through the
judge machinery, parsed, never invented, cached, scored by the SFT model into CANDIDATES_SCHEMA rows."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.errors import DataError, ParamsError
from pipeline.external_dispreferred import (
    ExternalAnswers,
    ImageRequest,
    MalformedAnswer,
    ask_writer,
    check_failed,
    check_writer,
    image_data_url,
    load_external_prompts,
    parse_list,
    run_external,
    score_pool,
    select_answers,
)
from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import CachedJudge, JudgeError, JudgeRequest
from pipeline.judges.panel import Generation, PanelConfigError
from pipeline.judges.prompts import PromptFileError
from pipeline.params import load_params, project_config, project_params_path
from pipeline.schema import CANDIDATES_SCHEMA, LESION_SCHEMA, POOL_SCHEMA, read_rows, write_rows
from pipeline.self_contrast import SampleConfig, sample_pool, score_candidates
from tests.conftest import make_rows

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(project_params_path())
ENV, KEY = "MEDALIGN_TEST_WRITER_KEY", "sk-test-writer-0123456789SECRET"
WRONG = {"yes": ["No", "left", "right", "large", "small"], "no": ["No.", "yes", "left", "right", "large"]}


def config(k: int = 3, batch_size: int = 8, **external) -> SampleConfig:
    return project_config(SampleConfig, "sample", k=k, batch_size=batch_size, source="external",
                          external={**PARAMS["sample"]["external"], **external})


def pool(n: int, seed: int = 0) -> list[dict]:
    return [{**r, "mine_strategy": "random", "mine_score": None, "mine_reason": None} for r in make_rows(n, seed)]


def correct_answer(request: JudgeRequest) -> str:
    user = request.messages[-1][1]
    return re.search(r"Correct answer: (.*)", user).group(1).strip()


def numbered(items: Sequence[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))


class ScriptedWriter:
    """A backend that writes a numbered list per correct answer (`script`, default `WRONG`); requests
    whose correct answer is in `fail` get no answer and a `JudgeError` after the others, as the openai
    backend does. The hf prefill "1." is continued, as a local model would."""

    def __init__(self, script: Callable[[str], str] | None = None, fail: set[str] | None = None) -> None:
        self.script = script or (lambda answer: numbered(WRONG[answer]))
        self.fail = fail or set()
        self.asked: list[JudgeRequest] = []
        self.calls: list[int] = []

    def identity(self) -> dict:
        return {"backend": "scripted", "model": "scripted"}

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        self.calls.append(len(requests))
        failed = 0
        for i, request in enumerate(requests):
            answer = correct_answer(request)
            if answer in self.fail:
                failed += 1
                continue
            self.asked.append(request)
            reply = self.script(answer)
            yield i, reply.removeprefix(request.prefill)
        if failed:
            raise JudgeError(f"{failed} request(s) failed")


def writer(cache: ResponseCache, backend: ScriptedWriter, cfg: SampleConfig) -> CachedJudge:
    prompts = load_external_prompts(cfg.external.prompts)
    return CachedJudge(config=cfg.external.writer, backend=backend, cache=cache,
                       prompt_version={"external": prompts.version})


def ask(tmp: Path, rows: list[dict], backend: ScriptedWriter, cfg: SampleConfig) -> tuple[ExternalAnswers, CachedJudge]:
    prompts = load_external_prompts(cfg.external.prompts)
    with ResponseCache(tmp / "cache.sqlite") as cache:
        judge = writer(cache, backend, cfg)
        return ask_writer(rows, cfg.k, judge, prompts, cfg.external), judge


# ------------------------------------------------------------------------------------- parsing


def test_numbered_bulleted_and_json_lists_are_read_in_order():
    assert parse_list("1. Pneumonia\n2) **Pleural effusion**\n(3) 'Left lung'.\n- cardiomegaly\n") == [
        "Pneumonia", "Pleural effusion", "Left lung", "cardiomegaly"]
    # prose around the list is ignored; a decimal is not an item marker
    assert parse_list("Here are wrong answers:\n1. 1.5 cm\n2. 3 cm\nHope this helps.") == ["1.5 cm", "3 cm"]
    assert parse_list('```json\n["kidney", "spleen", 3]\n```') == ["kidney", "spleen", "3"]
    assert parse_list('["a", "b"]') == ["a", "b"]
    with pytest.raises(MalformedAnswer) as empty:
        parse_list(" \n ")
    assert empty.value.cause == "empty"
    with pytest.raises(MalformedAnswer) as prose:
        parse_list("The answer could be the liver or the spleen.")
    assert prose.value.cause == "malformed"


def test_duplicates_and_the_correct_answer_are_rejected_after_normalization():
    items = ["Yes.", "no", "No", "the left", "", "left", "right", "large"]
    kept, dropped = select_answers(items, "yes", k=3)
    # "the left" and "left" normalize alike (articles dropped); "Yes." is the correct answer
    assert kept == ["no", "the left", "right"]
    assert dropped == {"equal_to_chosen": 1, "duplicate": 2, "empty": 1, "beyond_k": 1}
    # a closed question: what the evaluation would score correct is not a wrong answer either
    kept, dropped = select_answers(["No, there is no mass", "Yes", "nodule", "no"], "no", k=3, closed=True)
    assert kept == ["Yes", "nodule"] and dropped == {"counted_correct": 1, "equal_to_chosen": 1}
    assert select_answers(["No, there is no mass"], "no", k=3)[0] == ["No, there is no mass"]  # open: kept


def test_the_prompts_file_is_checked(tmp_path):
    prompts = load_external_prompts(REPO / "pipeline/external_prompts.yaml")
    request = prompts.request(pool(1)[0], 4, "writer", prefill=True, send_image=False)
    assert request.prefill == "1." and "Write 4 different wrong answers" in request.messages[-1][1]
    assert "You cannot see the image" in request.messages[-1][1]
    raw = yaml.safe_load((REPO / "pipeline/external_prompts.yaml").read_text())
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({**raw, "request_turn": "Q: $question A: $answer $colour"}))
    with pytest.raises(PromptFileError, match=r"unknown placeholder\(s\) \['colour'\]"):
        load_external_prompts(bad)
    with pytest.raises(PanelConfigError, match="sample.external.writer.role 'surgeon' is not in"):
        cfg = config()
        check_writer(cfg.external.replace(writer={**cfg.external.writer.model_dump(), "role": "surgeon"}), prompts)


# ------------------------------------------------------------------------------------- params


def test_send_image_with_an_hf_writer_is_rejected():
    with pytest.raises(ParamsError, match=r"`sample.external` has send_image: true with an hf writer"):
        config(send_image=True)


def test_a_structured_output_writer_is_rejected():
    remote = {"name": "gpt", "role": "writer", "backend": "openai", "model": "gpt-4o",
              "base_url": "http://127.0.0.1:9/v1", "api_key_env": ENV, "timeout_s": 5.0, "max_concurrency": 2,
              "max_new_tokens": 64, "temperature": 0.0, "extra_body": {}, "preflight": False,
              "structured_output": "response_format", "sampling_fields": {}}
    with pytest.raises(ParamsError, match="writer.structured_output must be none"):
        config(writer=remote)
    assert config(writer={**remote, "structured_output": "none"}, send_image=True).external.send_image


def test_the_default_is_self_and_the_packaged_offline_writer():
    cfg = project_config(SampleConfig, "sample")
    assert cfg.source == "self"
    assert (cfg.external.writer.backend, cfg.external.writer.model) == ("hf", "smollm2")
    assert cfg.external.send_image is False


# ------------------------------------------------------------------------------------- the library


def test_rows_follow_the_candidates_contract(tmp_path, tiny_vlm):
    rows = pool(6)
    cfg = config(k=3, batch_size=4)
    answers, _ = ask(tmp_path, rows, ScriptedWriter(), cfg)
    done = score_pool(tiny_vlm, rows, answers.texts, cfg, tmp_path / "work", {"pool": "p", "model": "m"})
    write_rows(done.table.to_pylist(), tmp_path / "candidates.parquet", CANDIDATES_SCHEMA)  # validates
    out = read_rows(tmp_path / "candidates.parquet", CANDIDATES_SCHEMA)
    assert [r["id"] for r in out] == [r["id"] for r in rows] and done.batches == 2
    for row, source in zip(out, rows, strict=True):
        assert all(row[k] == source[k] for k in ("id", "question", "answer", "image", "answer_type", "modality"))
        # "No." is the correct answer "no" for the no-entries: rejected; k = 3 keeps the first three usable
        expected = [w for w in WRONG[source["answer"]] if w.lower().rstrip(".") != source["answer"]][:3]
        assert [c["text"] for c in row["candidates"]] == expected
        assert row["chosen_token_ids"] == tiny_vlm.answer_ids(source["answer"])
        assert row["sensitivity"] == []
        for level, cand in enumerate(row["candidates"], start=1):
            assert cand["level"] == level and cand["token_ids"] == tiny_vlm.answer_ids(cand["text"])
            assert cand["positions"] == cand["original_tokens"] == cand["replacement_tokens"] == []
        # log p_sft(. | full image, question): the scorer self-sampling uses
        pairs = [(0, row["chosen_token_ids"])] + [(0, c["token_ids"]) for c in row["candidates"]]
        direct = score_candidates(tiny_vlm, [source["image"]], [source["question"]], pairs,
                                  contexts=[source["context"]])
        assert [row["chosen_logprob"]] + [c["logprob"] for c in row["candidates"]] == pytest.approx(direct, abs=1e-5)
    # the chosen log-prob means what it means for self-sampling
    selfcfg = project_config(SampleConfig, "sample", k=2, batch_size=8)
    own = sample_pool(tiny_vlm, rows, selfcfg, tmp_path / "self", {"pool": "p", "model": "m"}).table.to_pylist()
    assert [r["chosen_logprob"] for r in out] == pytest.approx([r["chosen_logprob"] for r in own], abs=1e-3)
    assert [r["chosen_token_ids"] for r in out] == [r["chosen_token_ids"] for r in own]
    m = answers.metrics
    assert m["requested_candidates"] == 18 and m["written_candidates"] == 18 and m["entries_short"] == 0
    assert m["dropped_answers"]["equal_to_chosen"] == sum(r["answer"] == "no" for r in rows)


def test_requests_are_cached_deduplicated_and_a_rerun_asks_nothing(tmp_path):
    rows = pool(8)  # one question: entries with the same answer share their request
    cfg = config()
    backend = ScriptedWriter()
    first, judge = ask(tmp_path, rows, backend, cfg)
    assert backend.calls == [2] and judge.stats.asked == 2 and judge.stats.deduplicated == 6
    assert first.metrics["requests"] == 8 and first.metrics["unique_requests"] == 2
    idle = ScriptedWriter(fail={"yes", "no"})
    again, judge = ask(tmp_path, rows, idle, cfg)
    assert idle.calls == [] and judge.stats.hits == 8 and again.texts == first.texts
    assert again.metrics == first.metrics
    # the prompt version, the decoding and k are in the key: a change asks again
    other = ScriptedWriter()
    ask(tmp_path, rows, other, config(k=4))
    assert other.calls == [2]


def test_a_failed_request_leaves_no_candidate_is_counted_and_asked_again(tmp_path):
    rows = pool(8)
    cfg = config(max_failed=1.0)
    failing = ScriptedWriter(fail={"no"})
    answers, _ = ask(tmp_path, rows, failing, cfg)
    no = [r["answer"] == "no" for r in rows]
    assert [bool(t) for t in answers.texts] == [not n for n in no]  # nothing invented for the failed ones
    assert answers.metrics["failed_by_cause"] == {"backend": sum(no), "empty": 0, "malformed": 0, "all_rejected": 0}
    assert answers.metrics["entries_without_candidates"] == sum(no)
    assert "1 request(s) failed" in answers.metrics["backend_error"]
    healthy = ScriptedWriter()
    again, _ = ask(tmp_path, rows, healthy, cfg)  # not cached: asked again, and only it
    assert [correct_answer(r) for r in healthy.asked] == ["no"] and all(again.texts)


def test_empty_malformed_and_all_rejected_answers_are_counted(tmp_path):
    rows = [{**r, "answer": a} for r, a in zip(pool(4), ["left", "right", "large", "small"], strict=True)]
    replies = {"left": "", "right": "I cannot answer that.", "large": "1. Large\n2. large.", "small": "1. big"}
    plain = {**PARAMS["sample"]["external"]["writer"], "prefill": False}
    answers, _ = ask(tmp_path, rows, ScriptedWriter(lambda a: replies[a]), config(max_failed=1.0, writer=plain))
    assert answers.texts == [[], [], [], ["big"]]
    assert answers.metrics["failed_by_cause"] == {"backend": 0, "empty": 1, "malformed": 1, "all_rejected": 1}
    assert answers.metrics["entries_short"] == 1 and answers.metrics["written_candidates"] == 1


def test_more_failed_entries_than_max_failed_fail_the_stage_naming_the_param(tmp_path):
    rows = pool(8)
    cfg = config(max_failed=0.25)
    answers, _ = ask(tmp_path, rows, ScriptedWriter(fail={"no"}), cfg)
    message = check_failed(answers, cfg.external)
    assert message is not None and "more than sample.external.max_failed (25.0%)" in message
    assert "backend" in message and check_failed(answers, config(max_failed=0.9).external) is None


def test_run_external_fails_before_loading_the_sft_model(tmp_path, monkeypatch):
    import pipeline.judges.judge as judge_module

    backend = ScriptedWriter(fail={"yes", "no"})
    monkeypatch.setattr(judge_module, "build_judges",
                        lambda configs, cache, version, retry: [CachedJudge(configs[0], backend, cache, version)])
    cfg = config()
    reports = []

    def load():
        raise AssertionError("the SFT model was loaded")

    with pytest.raises(DataError, match=r"8 of 8 entries \(100.0%\) got no dispreferred candidate"):
        run_external(pool(8), cfg, load_external_prompts(cfg.external.prompts), tmp_path / "c.sqlite", load,
                     tmp_path / "work", {}, on_failure=lambda m, t: reports.append((m, t)))
    metrics, timings = reports[0]
    assert metrics["status"] == "failed" and "sample.external.max_failed" in metrics["failure"]
    assert metrics["failed_by_cause"]["backend"] == 8 and timings["cache"]["asked"] == 0


# ------------------------------------------------------------------------------------- images


def test_an_image_request_carries_a_data_url_part():
    from pipeline.judges.backends.openai import OpenAIBackend
    from pipeline.judges.panel import RequestRetry

    row = pool(1)[0]
    prompts = load_external_prompts(REPO / "pipeline/external_prompts.yaml")
    request = prompts.request(row, 3, "writer", prefill=False, send_image=True)
    assert isinstance(request, ImageRequest) and "The image is attached." in request.messages[-1][1]
    url = image_data_url(row["image"])
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == row["image"]
    retry = RequestRetry(max_retries=0, backoff_s=0.0, max_backoff_s=0.0, max_consecutive_failures=1)
    backend = OpenAIBackend("gpt", "gpt-4o", "http://127.0.0.1:9/v1", "PATH", 1.0, 1, retry)
    sent = backend.request_kwargs(request, Generation(64, 0.0))["messages"]
    assert sent[0] == {"role": "system", "content": prompts.roles["writer"]}
    assert sent[1]["content"][0] == {"type": "text", "text": request.messages[-1][1]}
    assert sent[1]["content"][1] == {"type": "image_url", "image_url": {"url": url}}


# ------------------------------------------------------------------------------------- the stage


class WriterServer:
    """A loopback OpenAI-compatible server that writes a numbered list of wrong answers; it records
    every chat request and whether it carried an image."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0,
                                                             "owned_by": "test"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                parts = body["messages"][-1]["content"]
                text = parts[0]["text"] if isinstance(parts, list) else parts
                answer = re.search(r"Correct answer: (.*)", text).group(1).strip()
                content = "Sure:\n" + numbered(WRONG[answer] + [answer.upper()])
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> WriterServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def stage_args(tmp: Path, output: str = "candidates.parquet") -> list[str]:
    return ["--params", str(tmp / "params.yaml"), "--input", str(tmp / "pool.parquet"), "--model", str(tmp / "sft"),
            "--output", str(tmp / output), "--metrics", str(tmp / "sample.json"), "--work-dir", str(tmp / "work"),
            "--cache", str(tmp / "external_cache.sqlite"), "--model-root", str(tmp / "judges"),
            "--lesions", str(_no_lesions(tmp)), "--timings", str(tmp / "timings.json")]


def _no_lesions(tmp: Path) -> Path:
    path = tmp / "lesions.parquet"
    if not path.exists():
        write_rows([], path, LESION_SCHEMA)
    return path


def write_params(tmp: Path, **sample) -> None:
    params = {"mask_ratio": PARAMS["mask_ratio"], "sample": {**PARAMS["sample"], "k": 3, "batch_size": 4, **sample}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))


def test_stage_external_end_to_end_with_an_openai_writer_and_images(tmp_path, tiny_vlm, monkeypatch):
    from pipeline.stages.sample import app

    monkeypatch.setenv(ENV, KEY)
    rows = pool(6)
    write_rows(rows, tmp_path / "pool.parquet", POOL_SCHEMA)
    tiny_vlm.save(tmp_path / "sft")
    with WriterServer() as server:
        remote = {"name": "gpt", "role": "writer", "backend": "openai", "model": "gpt-test", "base_url": server.url,
                  "api_key_env": ENV, "timeout_s": 5.0, "max_concurrency": 2, "max_new_tokens": 64,
                  "temperature": 0.0, "extra_body": {}, "preflight": True, "structured_output": "none",
                  "sampling_fields": {}}
        write_params(tmp_path, source="external",
                     external={**PARAMS["sample"]["external"], "writer": remote, "send_image": True,
                               "prompts": str(REPO / "pipeline/external_prompts.yaml")})
        result = CliRunner().invoke(app, stage_args(tmp_path))
        assert result.exit_code == 0, result.output + repr(result.exception)
        asked = list(server.requests)
        again = CliRunner().invoke(app, stage_args(tmp_path, "again.parquet"))
        assert again.exit_code == 0, again.output
        assert server.requests == asked  # every answer from the cache
    # one request per entry with its image as a data URL; entries with the same image and answer (the
    # blank "no" images) share theirs
    unique = {(image_data_url(r["image"]), r["answer"]) for r in rows}
    assert 1 < len(unique) < 6 and len(asked) == len(unique)
    sent = set()
    for body in asked:
        text, image = body["messages"][-1]["content"]
        assert image["type"] == "image_url" and "Write 3 different wrong answers" in text["text"]
        sent.add((image["image_url"]["url"], re.search(r"Correct answer: (.*)", text["text"]).group(1)))
    assert sent == unique
    out = read_rows(tmp_path / "candidates.parquet", CANDIDATES_SCHEMA)
    assert read_rows(tmp_path / "again.parquet", CANDIDATES_SCHEMA) == out
    assert all(len(r["candidates"]) == 3 and r["sensitivity"] == [] for r in out)
    report = json.loads((tmp_path / "sample.json").read_text())
    assert report["source"] == "external" and "mask_strategy" not in report and report["candidates"] == 18
    ext = report["external"]
    assert (ext["writer"], ext["backend"], ext["model"], ext["send_image"]) == ("gpt", "openai", "gpt-test", True)
    assert ext["requested_candidates"] == 18 and ext["written_candidates"] == 18
    assert ext["entries_without_candidates"] == 0 and ext["unique_requests"] == len(unique)
    n_no = sum(r["answer"] == "no" for r in rows)
    assert ext["dropped_answers"]["beyond_k"] == 2 * 6 - n_no
    assert ext["dropped_answers"]["equal_to_chosen"] == 6 + n_no
    assert "cache" not in ext  # it depends on earlier runs: in the timings
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["cache"]["hits"] == 6 and timings["cache"]["asked"] == 0
    assert "cache hits 6, asked 0" in again.output
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    assert KEY.encode() not in (tmp_path / "external_cache.sqlite").read_bytes()


def test_stage_self_output_is_the_self_path_unchanged(tmp_path, tiny_vlm):
    from pipeline.stages.sample import app

    rows = pool(6)
    write_rows(rows, tmp_path / "pool.parquet", POOL_SCHEMA)
    tiny_vlm.save(tmp_path / "sft")
    write_params(tmp_path)
    result = CliRunner().invoke(app, stage_args(tmp_path))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not (tmp_path / "external_cache.sqlite").exists()  # source self never opens the writer's cache
    cfg = project_config(SampleConfig, "sample", k=3, batch_size=4)
    from pipeline.models.profiles import load_vlm

    torch.manual_seed(0)
    direct = sample_pool(load_vlm(tmp_path / "sft"), rows, cfg, tmp_path / "direct", {"pool": "p", "model": "m"})
    assert read_rows(tmp_path / "candidates.parquet", CANDIDATES_SCHEMA) == direct.table.to_pylist()
    report = json.loads((tmp_path / "sample.json").read_text())
    assert report["source"] == "self" and report["mask_strategy"] == cfg.mask_strategy
    assert "external" not in report
