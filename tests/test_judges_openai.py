"""The `openai` backend and the `score` stage against a real chat-completions server on loopback.

The server is started by each test, speaks GET /v1/models and POST /v1/chat/completions, and can
be told to answer 429, 500, a hang past the client timeout, malformed answer content, an
unreadable body, or a fixed error status. Every fault test asserts how long the failure took and
how many requests reached the server.
"""

from __future__ import annotations

import _thread
import json
import logging
import re
import signal
import socket
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.errors import ParamsError
from pipeline.judges.backends.openai import ANSWER_SCHEMA, OpenAIBackend
from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import JudgeError, JudgeRequest
from pipeline.judges.panel import parse_score_config
from pipeline.judges.scoring import TooManyUnscored, score_panel
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
         "context": [],
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
        self.requests: list[dict] = []  # every chat request body received
        self.gets: list[str] = []  # every GET path received
        self.models = ["judge-a", "judge-b"]  # what GET /v1/models lists
        self.models_error: tuple[int, bytes] | None = None  # answer GET /v1/models with this status and body
        self.chat_error: tuple[int, bytes] | None = None  # answer every chat request with this status and body
        self.served: Counter[str] = Counter()  # what each request got
        self.auth: set[str] = set()
        self.always_fail: set[str] = set()  # responses for which the server answers 500 forever
        # Set on exit: a hanging handler must not outlive its test. One that wakes later and prints a
        # traceback in its thread races the main thread's `ast.parse` (Python 3.11's traceback module
        # parses source for its carets), which CPython 3.11.7 reports as "AST constructor recursion
        # depth mismatch" in an unrelated test (cpython gh-106905).
        self.closed = threading.Event()
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

            def do_GET(self) -> None:
                with server.lock:
                    server.gets.append(self.path)
                if self.path != "/v1/models":
                    return self._send(404, b'{"detail": "Not Found"}')  # what vLLM (FastAPI) answers
                if server.models_error:
                    return self._send(*server.models_error)
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]
                return self._send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.add(self.headers.get("Authorization", ""))
                    fault = server.faults.pop(0) if server.faults else "ok"
                    server.served[fault] += 1
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"detail": "Not Found"}')
                if server.chat_error:
                    status, text = server.chat_error
                    echo = text.replace(b"$AUTH", self.headers.get("Authorization", "").encode())
                    return self._send(status, echo)
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
                if fault == "hang" and server.closed.wait(server.hang_s):
                    return None  # the test is over: its client has gone
                if fault == "bad_body":
                    return self._send(200, b'{"id": "x", "choices": [{"mess')
                if fault == "malformed":
                    content = "Score: seven. Reason: it is plausible."
                else:
                    try:
                        content = server.verdict(body["model"], user, response)
                    except KeyError:  # answered, not raised: a traceback in this thread is what the exit avoids
                        message = json.dumps({"error": {"message": f"no verdict for {response}"}})
                        return self._send(400, message.encode())
                reply = {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                return self._send(200, json.dumps(reply).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown

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
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def section(url: str, tmp_path: Path, judge: dict | None = None, **over) -> dict:
    judge = {"backend": "openai", "base_url": url, "api_key_env": ENV, "timeout_s": 0.5, "max_concurrency": 4,
             "max_new_tokens": 32, "temperature": 0.0, "extra_body": {}, "preflight": True,
             "structured_output": "none", "sampling_fields": {}, **(judge or {})}
    raw = {
        "judges": [{"name": "A", "role": "a", "model": "judge-a", **judge},
                   {"name": "B", "role": "b", "model": "judge-b", **judge}],
        "rounds": 2,
        "retries": 2,
        "max_unscored": 0.0,
        "request_retry": {"max_retries": 4, "backoff_s": 0.01, "max_backoff_s": 0.05, "max_consecutive_failures": 3},
        "prompts": str(tmp_path / "prompts.yaml"),
        "weights": {"mu": 1.0, "sigma": 0.31622776601683794, "clip": [0.75, 1.25]},
        "rationales": {"enabled": False, "judge": "A", "max_new_tokens": 32},
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


def score_file(config, tmp: Path, reports: list | None = None) -> dict:
    """What the stage does: ranked rows in, scored rows and metrics out, through the cache. A failed
    run's report (metrics, timings) is appended to `reports`."""
    on_failure = None if reports is None else (lambda metrics, timings: reports.append((metrics, timings)))
    scored, metrics, _ = score_panel(config, read_rows(tmp / "ranked.parquet", RANKED_SCHEMA), cache_path(tmp),
                                     progress=False, on_failure=on_failure)
    write_rows(scored, tmp / "scored.parquet", SCORED_SCHEMA)
    return metrics


def stage_args(tmp: Path, output: str, metrics: str) -> list[str]:
    (tmp / "models").mkdir(exist_ok=True)
    return ["--params", str(tmp / "params.yaml"), "--input", str(tmp / "ranked.parquet"),
            "--output", str(tmp / output), "--metrics", str(tmp / metrics), "--cache", str(cache_path(tmp)),
            "--model-root", str(tmp / "models"), "--timings", str(tmp / "timings.json"), "--no-progress"]


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
    timings = json.loads((tmp / "timings.json").read_text())  # what depends on the server and the cache's history
    assert "request_retries" not in metrics and "cache" not in metrics
    assert timings["request_retries"] == {"429": 1, "5xx": 1, "timeout": 1, "bad_response": 1}
    assert metrics["missing"] == {"turns": 0, "unscored_responses": 0, "malformed_answers": 1}
    # 4 first turns + 4 second turns + 2 more for r2 + 1 malformed retry = 11 answers. B's turn 4 on r2
    # is the very request of its turn 2 (shown A's same 3 and reason): the cache answers it.
    assert timings["cache"] == {"hits": 1, "asked": 10, "hit_rate": 1 / 11, "deduplicated": 0}
    assert len(server.requests) == 10 + 4  # plus the four failed transport attempts
    assert metrics["agreement_rate"] == 0.75 and metrics["rounds_histogram"] == {"1": 3, "2": 1}
    assert server.gets == ["/v1/models"] * 2  # one preflight per judge
    captured = capsys.readouterr()
    # Retries are announced, at most one line per judge every 2 s: here the first (429 or 500).
    assert re.search(r"judge A: HTTP (429|500) .*http://127\.0\.0\.1:\d+/v1.*; retry 1 of 4 in 0\.0 s", result.output)
    assert_no_key_anywhere(tmp, result.output, captured.out, captured.err, caplog.text)

    # A rerun is served entirely from the cache: the server is not even running. The preflight
    # would notice that, so it is switched off (how to replay a cache offline).
    result = CliRunner().invoke(app, stage_args(tmp, "scored2.parquet", "score2.json"))
    assert result.exit_code == 1 and "connection error from" in str(result.exception)
    (tmp / "params.yaml").write_text(yaml.safe_dump({"score": section(server.url, tmp, judge={"preflight": False})}))
    result = CliRunner().invoke(app, stage_args(tmp, "scored2.parquet", "score2.json"))
    assert result.exit_code == 0, result.output
    assert final_scores(tmp / "scored2.parquet") == EXPECTED
    assert json.loads((tmp / "timings.json").read_text())["cache"]["hits"] == 11  # history, not a cached metric
    assert "cache" not in json.loads((tmp / "score2.json").read_text())


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


def many_rows(tmp: Path, n: int) -> None:
    """`n` distinct dispreferred responses (the tables answer r1..r4; the faults below never get there)."""
    write_rows(ranked_rows([[f"r{i}"] for i in range(n)]), tmp / "ranked.parquet", RANKED_SCHEMA)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fail(config, tmp: Path, error=JudgeError) -> tuple[str, float, list]:
    """Run the stage's library half, expecting `error`: its message, the seconds it took, the reports."""
    reports: list = []
    start = time.perf_counter()
    with pytest.raises(error) as failure:
        score_file(config, tmp, reports)
    seconds = time.perf_counter() - start
    message = str(failure.value)
    assert KEY not in "".join(traceback.format_exception(failure.value))
    return message, seconds, reports


def test_a_dead_port_fails_in_the_preflight_in_a_second(stage_files):
    tmp = stage_files
    url = f"http://127.0.0.1:{free_port()}/v1"
    config = parse_score_config(section(url, tmp, request_retry={"max_retries": 6, "backoff_s": 1.0,
                                                                  "max_backoff_s": 30.0, "max_consecutive_failures": 3}))
    message, seconds, reports = fail(config, tmp)
    assert seconds < 3, seconds  # not the ~1 minute of the retry schedule, let alone once per response
    assert f"judge A: connection error from {url} (GET /models, the preflight" in message
    assert "is the server running" in message
    (metrics, timings), = reports  # the report of the failed run
    assert metrics["status"] == "failed" and metrics["failure"] == message and metrics["cache"]["asked"] == 0
    assert timings["status"] == "failed" and timings["seconds"] is None


def test_a_base_url_without_scheme_is_refused_by_the_params_check(stage_files):
    tmp = stage_files
    start = time.perf_counter()
    with pytest.raises(ParamsError, match="must start with http:// or https://"):
        parse_score_config(section("127.0.0.1:8000/v1", tmp))
    assert time.perf_counter() - start < 1


def test_preflight_finds_a_model_the_server_does_not_serve(stage_files):
    tmp = stage_files
    with ChatServer() as server:
        server.models = ["judge-a", "smollm2-135m-instruct"]
        config = parse_score_config(section(server.url, tmp))
        message, seconds, _ = fail(config, tmp)
    assert seconds < 3 and server.requests == [] and server.gets == ["/v1/models"] * 2
    assert "judge B: model 'judge-b' is not served by" in message
    assert "it serves 'judge-a', 'smollm2-135m-instruct'" in message


def test_preflight_404_quotes_the_server_and_hints_at_v1(stage_files):
    tmp = stage_files
    with ChatServer() as server:
        root = server.url.removesuffix("/v1")
        message, seconds, _ = fail(parse_score_config(section(root, tmp)), tmp)
    assert seconds < 3 and server.requests == [] and server.gets == ["/models"]
    assert f"judge A: HTTP 404 from {root} (GET /models, the preflight): {{\"detail\": \"Not Found\"}}" in message
    assert "does base_url end in /v1" in message and "preflight: false" in message


def test_preflight_401_names_the_key_variable_never_the_key(stage_files):
    tmp = stage_files
    with ChatServer() as server:
        server.models_error = (401, json.dumps({"error": {"message": f"bad key {KEY}"}}).encode())
        message, seconds, _ = fail(parse_score_config(section(server.url, tmp)), tmp)
    assert seconds < 3 and server.requests == []
    assert "HTTP 401" in message and "bad key ***" in message and f"${ENV}" in message


@pytest.mark.parametrize("status, body, expected", [
    (401, b'{"error": {"message": "bad key $AUTH"}}', 'bad key Bearer ***"}}; the server refused the API key'),
    (404, b'{"detail": "Not Found"}', '{"detail": "Not Found"}; does base_url end in /v1'),
])
def test_a_401_or_404_on_chat_stops_the_turn_at_once(stage_files, status, body, expected):
    """Without the preflight (a server without /models), the first 401/404 stops the turn: of 40
    requests, at most the `max_concurrency` already in flight are sent, and none is retried."""
    tmp = stage_files
    many_rows(tmp, 40)
    with ChatServer() as server:
        server.chat_error = (status, body)
        config = parse_score_config(section(server.url, tmp, judge={"preflight": False}))
        message, seconds, reports = fail(config, tmp)
    assert seconds < 3, seconds
    assert server.gets == [] and 1 <= len(server.requests) <= 4  # max_concurrency, not 40
    assert f"judge A: HTTP {status} from {server.url} (POST /chat/completions): " in message
    assert expected in message and "the turn was stopped: 0 of 40 requests answered" in message
    (metrics, _), = reports
    assert metrics["status"] == "failed" and metrics["responses"] == 40 and KEY not in json.dumps(metrics)


def test_failures_in_a_row_stop_the_turn(stage_files):
    """A server that answers 500 to everything: after max_consecutive_failures (3) requests failed
    for good, the turn stops; without the breaker all 40 would be tried, with every retry."""
    tmp = stage_files
    many_rows(tmp, 40)
    with ChatServer() as server:
        server.chat_error = (500, b'{"error": {"message": "CUDA out of memory"}}')
        config = parse_score_config(section(server.url, tmp, judge={"max_concurrency": 2}, request_retry={
            "max_retries": 1, "backoff_s": 0.01, "max_backoff_s": 0.05, "max_consecutive_failures": 3}))
        message, seconds, _ = fail(config, tmp)
    assert seconds < 3, seconds
    assert len(server.requests) <= (3 + 1) * 2  # 3 failed requests + 1 in flight, 2 attempts each
    assert "3 requests in a row failed; the last: judge A: HTTP 500 from" in message
    assert "CUDA out of memory" in message and "still after 1 retries" in message


def test_connection_errors_outlasting_the_retries_stop_the_turn(monkeypatch):
    """The server went away mid-run (no preflight here): the first request whose connection errors
    outlast its retries stops the turn; the queued requests are never tried."""
    from pipeline.judges.panel import Generation, RequestRetry

    monkeypatch.setenv(ENV, KEY)
    notes: list[str] = []
    retry = RequestRetry(max_retries=2, backoff_s=0.01, max_backoff_s=0.05, max_consecutive_failures=3)
    backend = OpenAIBackend("A", "judge-a", f"http://127.0.0.1:{free_port()}/v1", ENV, 1.0, 2, retry, note=notes.append)
    requests = [JudgeRequest(messages=(("user", f"RESPONSE<<r{i}>>"),)) for i in range(50)]
    start = time.perf_counter()
    with pytest.raises(JudgeError) as failure:
        list(backend.complete(requests, Generation(8, 0.0)))
    assert time.perf_counter() - start < 3
    assert "connection error from http://127.0.0.1:" in str(failure.value)
    assert "still after 2 retries" in str(failure.value) and "0 of 50 requests answered" in str(failure.value)
    assert backend.retries["connection"] <= 2 * 2  # the 2 requests in flight, 2 retries each; not 50 x 2
    assert notes and "connection error" in notes[0] and "retry 1 of 2 in 0.0 s" in notes[0]


@pytest.mark.parametrize("fault", ["hang", "backoff"])
def test_ctrl_c_returns_at_once(stage_files, fault):
    """Ctrl-C while requests hang (timeout 10 s) or wait out a backoff (30 s): the stage stops within
    a second, sends nothing more, and writes its report (status interrupted)."""
    # A process started in the background (nohup, `cmd &`) inherits SIGINT ignored, and then
    # interrupt_main does nothing: give it Python's own handler, as an interactive run has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_returns_at_once(stage_files, fault)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_returns_at_once(stage_files, fault):
    tmp = stage_files
    many_rows(tmp, 20)
    with ChatServer(hang_s=8) as server:
        if fault == "hang":
            server.faults = ["hang"] * 100
        else:
            server.chat_error = (503, b'{"error": {"message": "loading"}}')
        config = parse_score_config(section(server.url, tmp, judge={"timeout_s": 10.0}, request_retry={
            "max_retries": 6, "backoff_s": 30.0, "max_backoff_s": 30.0, "max_consecutive_failures": 3}))
        reports: list = []
        timer = threading.Timer(1.0, _thread.interrupt_main)
        timer.start()
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            score_file(config, tmp, reports)
        seconds = time.perf_counter() - start
        timer.join()
        sent = len(server.requests)
        time.sleep(0.3)
        assert len(server.requests) == sent  # nothing is sent after the interrupt
    assert seconds < 2.5, seconds  # 1 s until the interrupt, then promptly
    assert sent <= 4  # max_concurrency
    (metrics, timings), = reports
    assert metrics["status"] == "interrupted" and timings["status"] == "interrupted"


def test_too_many_unscored_responses_fail_the_stage_with_a_report(stage_files):
    """A judge that never answers in the format: every response ends unscored; the stage fails
    (exit 1) with the count and share, and still writes its report and timings."""
    tmp = stage_files
    with ChatServer(["malformed"] * 1000) as server:
        (tmp / "params.yaml").write_text(yaml.safe_dump({"score": section(server.url, tmp, max_unscored=0.5)}))
        start = time.perf_counter()
        result = CliRunner().invoke(app, stage_args(tmp, "scored.parquet", "reports/score.json"))
        seconds = time.perf_counter() - start
    assert seconds < 5, seconds
    assert result.exit_code == 1 and isinstance(result.exception, TooManyUnscored)
    message = str(result.exception)
    assert message.startswith("4 of 4 dispreferred responses (100.0%) got no valid score from any judge, more than "
                              "score.max_unscored (50.0%); e.g. judge A answered 'Score: seven.")
    assert "structured_output" in message
    metrics = json.loads((tmp / "reports" / "score.json").read_text())
    assert metrics["status"] == "failed" and metrics["failure"] == message
    timings = json.loads((tmp / "timings.json").read_text())
    assert metrics["missing"]["unscored_responses"] == 4 and timings["cache"]["asked"] == len(server.requests)
    assert timings["status"] == "failed"
    assert not (tmp / "scored.parquet").exists()


@pytest.mark.parametrize("mode", ["response_format", "guided_json"])
def test_structured_output_and_sampling_fields_shape_the_request(stage_files, mode):
    tmp = stage_files
    judge = {"structured_output": mode, "sampling_fields": {"max_tokens": "max_completion_tokens", "temperature": None}}
    with ChatServer() as server:
        metrics = score_file(parse_score_config(section(server.url, tmp, judge=judge)), tmp)
    assert final_scores(tmp / "scored.parquet") == EXPECTED and metrics["status"] == "ok"
    body = server.requests[0]
    assert body["max_completion_tokens"] == 32 and "max_tokens" not in body and "temperature" not in body
    if mode == "response_format":
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "clinical_relevance_verdict", "schema": ANSWER_SCHEMA, "strict": True},
        }
        assert "guided_json" not in body
    else:
        assert body["guided_json"] == ANSWER_SCHEMA and "response_format" not in body
    assert ANSWER_SCHEMA["properties"]["score"]["enum"] == list(range(11))


def test_the_request_schema_changes_the_cache_key(stage_files):
    """Constrained decoding can answer differently: a judge switched to it is asked again."""
    tmp = stage_files
    with ChatServer() as server:
        score_file(parse_score_config(section(server.url, tmp)), tmp)
        first = len(server.requests)
        metrics = score_file(parse_score_config(section(server.url, tmp, judge={"structured_output": "guided_json"})),
                             tmp)
    assert metrics["cache"]["asked"] == first and len(server.requests) == 2 * first


def test_missing_key_variable_is_a_clear_error(stage_files, monkeypatch):
    tmp = stage_files
    monkeypatch.delenv(ENV)
    config = parse_score_config(section("http://127.0.0.1:9/v1", tmp))
    with pytest.raises(JudgeError, match=ENV):
        score_file(config, tmp)
