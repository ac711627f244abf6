"""The `openai` backend and the `score` stage against a real chat-completions server on loopback.

The server is started by each test, speaks POST /v1/chat/completions, and can be told to answer
429, 500, a hang past the client timeout, malformed answer content, or an unreadable body.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import JudgeError
from pipeline.judges.panel import parse_score_config
from pipeline.judges.scoring import score_panel
from pipeline.schema import RANKED_SCHEMA, SCORED_SCHEMA, read_rows, write_rows
from pipeline.stages.score import app

# The prompt file and ranked rows of tests/test_judges.py, repeated here so the two files stand alone.
SCRIPT_PROMPTS = """\
version: test-1
roles:
  a: You are judge A.
  b: You are judge B.
rubric: 'Reply {"score": <0-10>, "reason": "..."}'
first_turn: 'RESPONSE<<$response>> Q<<$question>> REF<<$reference>>'
followup_turn: 'RESPONSE<<$response>> Q<<$question>> REF<<$reference>> PREVIOUS<<$previous_score>> by $previous_judge: $previous_reason'
retry_turn: 'RETRY<<$error>>'
"""


def ranked_rows(texts_per_row: list[list[str]]) -> list[dict]:
    png = bytes.fromhex("89504e470d0a1a0a")  # any bytes: the judges never see the image
    return [
        {"id": f"e{i}", "dataset": "unit", "split": "train", "image": png, "question": f"question {i}?",
         "answer": f"reference {i}", "answer_type": "open", "modality": "ct", "question_type": "presence",
         "rejected": [{"text": t, "similarity": 0.5, "level": j + 1, "logprob": -1.0} for j, t in enumerate(texts)]}
        for i, texts in enumerate(texts_per_row)
    ]


KEY = "sk-test-0123456789abcdefSECRET"
ENV = "MEDALIGN_TEST_JUDGE_KEY"

# Judge A and judge B (told apart by the model name) each score a response from their table.
# B agrees with a previous score shown to it when it is within 1 of its own.
TABLE_A = {"r1": 7, "r2": 3, "r3": 9, "r4": 1}
TABLE_B = {"r1": 7, "r2": 6, "r3": 8, "r4": 1}
# r1: 7/7 agreed round 1. r2: A3 B6 A3 B6 (rounds 2) -> mean 4.5. r3: A9, B shown 9 agrees -> 9 at once.
EXPECTED = {"r1": (7.0, True, 1), "r2": (4.5, False, 2), "r3": (9.0, True, 1), "r4": (1.0, True, 1)}


class ChatServer:
    """A scripted OpenAI-compatible server. `faults` are served, in order, to the first requests."""

    def __init__(self, faults: list[str] | None = None, hang_s: float = 1.5) -> None:
        self.faults = list(faults or [])
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # every request body received
        self.served: Counter[str] = Counter()  # what each request got
        self.auth: set[str] = set()
        self.always_fail: set[str] = set()  # responses for which the server answers 500 forever
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.add(self.headers.get("Authorization", ""))
                    fault = server.faults.pop(0) if server.faults else "ok"
                    server.served[fault] += 1
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                user = body["messages"][-1]["content"]
                response = re.search(r"RESPONSE<<(.*?)>>", user).group(1)
                if response in server.always_fail:
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "internal"}}')
                if fault == "401":  # a careless server that echoes the credentials it got
                    echo = json.dumps({"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
                    return self._send(401, echo.encode())
                if fault == "hang":
                    time.sleep(server.hang_s)
                if fault == "bad_body":
                    return self._send(200, b'{"id": "x", "choices": [{"mess')
                if fault == "malformed":
                    content = "Score: seven. Reason: it is plausible."
                else:
                    content = server.verdict(body["model"], user, response)
                reply = {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                return self._send(200, json.dumps(reply).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def verdict(model: str, user: str, response: str) -> str:
        table = TABLE_A if model == "judge-a" else TABLE_B
        own = table[response]
        shown = re.search(r"PREVIOUS<<(\d+)>>", user)
        if model == "judge-b" and shown and abs(int(shown.group(1)) - own) <= 1:
            own = int(shown.group(1))
        return json.dumps({"score": own, "reason": f"{model} on {response}"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def section(url: str, tmp_path: Path, **over) -> dict:
    judge = {"backend": "openai", "base_url": url, "api_key_env": ENV, "timeout_s": 0.5, "max_concurrency": 4,
             "max_new_tokens": 32, "temperature": 0.0, "extra_body": {}}
    raw = {
        "judges": [{"name": "A", "role": "a", "model": "judge-a", **judge},
                   {"name": "B", "role": "b", "model": "judge-b", **judge}],
        "rounds": 2,
        "retries": 2,
        "request_retry": {"max_retries": 4, "backoff_s": 0.01, "max_backoff_s": 0.05},
        "prompts": str(tmp_path / "prompts.yaml"),
        "weights": {"mu": 1.0, "sigma": 0.31622776601683794, "clip": [0.75, 1.25]},
    }
    raw.update(over)
    return raw


@pytest.fixture
def stage_files(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    (tmp_path / "prompts.yaml").write_text(SCRIPT_PROMPTS)
    rows = ranked_rows([["r1", "r2"], ["r3"], ["r4"]])
    write_rows(rows, tmp_path / "ranked.parquet", RANKED_SCHEMA)
    return tmp_path


def cache_path(tmp: Path) -> Path:
    return tmp / "work" / "judge_cache.sqlite"


def score_file(config, tmp: Path) -> dict:
    """What the stage does: ranked rows in, scored rows and metrics out, through the cache."""
    scored, metrics = score_panel(config, read_rows(tmp / "ranked.parquet", RANKED_SCHEMA), cache_path(tmp),
                                  progress=False)
    write_rows(scored, tmp / "scored.parquet", SCORED_SCHEMA)
    return metrics


def stage_args(tmp: Path, output: str, metrics: str) -> list[str]:
    (tmp / "models").mkdir(exist_ok=True)
    return ["--params", str(tmp / "params.yaml"), "--input", str(tmp / "ranked.parquet"),
            "--output", str(tmp / output), "--metrics", str(tmp / metrics), "--cache", str(cache_path(tmp)),
            "--model-root", str(tmp / "models"), "--no-progress"]


def assert_no_key_anywhere(root: Path, *texts: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key written to {path}"
    for text in texts:
        assert KEY not in text


def final_scores(path: Path) -> dict[str, tuple[float, bool, int]]:
    out = {}
    for row in read_rows(path, SCORED_SCHEMA):
        for rejected, judgement in zip(row["rejected"], row["judgements"], strict=True):
            out[rejected["text"]] = (judgement["score"], judgement["agreed"], judgement["rounds"])
    return out


def test_stage_survives_429_500_timeouts_and_malformed_answers(stage_files, capsys, caplog):
    tmp = stage_files
    caplog.set_level(logging.DEBUG)  # the openai client and httpx log at DEBUG: the key must not be there
    faults = ["429", "500", "hang", "malformed", "bad_body"]
    with ChatServer(faults) as server:
        (tmp / "params.yaml").write_text(yaml.safe_dump({"score": section(server.url, tmp)}))
        result = CliRunner().invoke(app, stage_args(tmp, "scored.parquet", "reports/score.json"))
    assert result.exit_code == 0, result.output
    assert final_scores(tmp / "scored.parquet") == EXPECTED
    assert server.auth == {f"Bearer {KEY}"}  # the key was used, from the environment
    metrics = json.loads((tmp / "reports" / "score.json").read_text())
    assert metrics["request_retries"] == {"429": 1, "5xx": 1, "timeout": 1, "bad_response": 1}
    assert metrics["missing"] == {"turns": 0, "unscored_responses": 0, "malformed_answers": 1}
    # 4 first turns + 4 second turns + 2 more for r2 + 1 malformed retry = 11 answers. B's turn 4 on r2
    # is the very request of its turn 2 (shown A's same 3 and reason): the cache answers it.
    assert metrics["cache"] == {"hits": 1, "asked": 10, "hit_rate": 1 / 11, "deduplicated": 0}
    assert len(server.requests) == 10 + 4  # plus the four failed transport attempts
    assert metrics["agreement_rate"] == 0.75 and metrics["rounds_histogram"] == {"1": 3, "2": 1}
    captured = capsys.readouterr()
    assert_no_key_anywhere(tmp, result.output, captured.out, captured.err, caplog.text)

    # A rerun is served entirely from the cache: the server is not even running.
    result = CliRunner().invoke(app, stage_args(tmp, "scored2.parquet", "score2.json"))
    assert result.exit_code == 0, result.output
    assert final_scores(tmp / "scored2.parquet") == EXPECTED
    assert json.loads((tmp / "score2.json").read_text())["cache"]["hits"] == 11


def test_a_dead_endpoint_fails_the_stage_and_keeps_every_answer_received(stage_files, caplog):
    tmp = stage_files
    caplog.set_level(logging.DEBUG)
    with ChatServer() as server:
        server.always_fail = {"r3"}
        config = parse_score_config(section(server.url, tmp))
        with pytest.raises(JudgeError) as failure:
            score_file(config, tmp)
    assert "HTTP 500" in str(failure.value) and "after 4 retries" in str(failure.value)
    trace = "".join(traceback.format_exception(failure.value))
    assert not (tmp / "scored.parquet").exists()
    with ResponseCache(cache_path(tmp)) as cache:
        assert len(cache) == 3  # judge A's answers on r1, r2, r4 arrived and are kept
    assert_no_key_anywhere(tmp, trace, caplog.text)

    # The endpoint recovers: the rerun asks only what is missing.
    with ChatServer() as server:
        config = parse_score_config(section(server.url, tmp))
        metrics = score_file(config, tmp)
    # 10 answers in all (no malformed retry this time), 1 of them the repeated request: 3 + 6 asked
    assert metrics["cache"]["hits"] == 3 + 1 and metrics["cache"]["asked"] == 6
    assert final_scores(tmp / "scored.parquet") == EXPECTED
    asked_first_turn = [r for r in server.requests if r["model"] == "judge-a" and "PREVIOUS<<" not in
                        r["messages"][-1]["content"]]
    assert [re.search(r"RESPONSE<<(.*?)>>", r["messages"][-1]["content"]).group(1) for r in asked_first_turn] == ["r3"]


def test_auth_errors_fail_at_once_without_leaking_the_key(stage_files):
    tmp = stage_files
    with ChatServer(["401"] * 50) as server:
        config = parse_score_config(section(server.url, tmp))
        with pytest.raises(JudgeError) as failure:
            score_file(config, tmp)
    message = str(failure.value)
    assert "HTTP 401" in message and "***" in message
    assert KEY not in "".join(traceback.format_exception(failure.value))
    assert server.served["401"] == 4  # one attempt per response, no retries


def test_missing_key_variable_is_a_clear_error(stage_files, monkeypatch):
    tmp = stage_files
    monkeypatch.delenv(ENV)
    config = parse_score_config(section("http://127.0.0.1:9/v1", tmp))
    with pytest.raises(JudgeError, match=ENV):
        score_file(config, tmp)
