"""The multi-judge consensus protocol of MMedPO §3.2.1, batched over the whole dataset.

Judges G_1..G_g take turns on a dispreferred response: turn 1 is G_1, turn 2 G_2, ..., turn g+1
G_1 again; a round is g turns, and there are at most `rounds` rounds. G_1 scores the response
fresh. Every later judge is shown the previous score (with its judge's name and reason) and
either agrees, by giving the same score, or gives its own. Every score joins the response's score
history S.

Consensus: the last g turns (one per judge) all gave the same valid score, i.e. every judge's
latest word is that score. With two judges, G_1 = 6 then G_2 = 6 is consensus in round 1; G_1 = 6,
G_2 = 4, G_1 = 4 is consensus in round 2. The final score is the agreed score; without consensus
after `rounds` rounds it is the mean of S (MMedPO: ŝ = Σ s_i / |S|).

Missing answers: a malformed answer is re-asked up to `retries` times (`PromptSet.retry`); if
every attempt is malformed the turn is recorded as missing. A missing turn adds nothing to S,
breaks a run of agreeing turns, and the next judge is shown the latest valid score (or scores
fresh if there is none). A response whose every turn is missing gets score None: nothing is
invented.

Batching: turn t asks its judge about every response still undecided, in one call, so a local
model generates in large batches and a remote one sees many requests to run concurrently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from pipeline.judges.judge import JudgeRequest
from pipeline.judges.parsing import MalformedAnswer, Verdict, parse_answer
from pipeline.judges.prompts import Case, Previous, PromptSet


class PanelJudge(Protocol):
    """What the protocol needs of a judge (`CachedJudge` and the scripted judges of the tests)."""

    name: str
    role: str
    prefill: bool

    def ask(self, requests: Sequence[JudgeRequest]) -> list[str]: ...


@dataclass
class Turn:
    turn: int  # 1-based, across rounds
    round: int  # 1-based
    judge: str
    shown: Previous | None  # the score this judge was asked to agree with, if any
    answers: list[str] = field(default_factory=list)  # raw answer of every attempt
    errors: list[str] = field(default_factory=list)  # why each malformed attempt was rejected
    score: int | None = None  # None: missing (every attempt malformed)
    reason: str | None = None

    def as_dict(self) -> dict:
        shown = None if self.shown is None else {"judge": self.shown.judge, "score": self.shown.score}
        return {"turn": self.turn, "round": self.round, "judge": self.judge, "shown": shown,
                "score": self.score, "reason": self.reason, "answers": self.answers, "errors": self.errors}


@dataclass
class Outcome:
    """The panel's verdict on one dispreferred response."""

    score: float | None  # the agreed score, else the mean of the history, None if no valid score
    rounds: int  # rounds used
    agreed: bool
    turns: list[Turn]

    @property
    def history(self) -> list[int]:
        return [t.score for t in self.turns if t.score is not None]

    def transcript(self) -> str:
        return json.dumps([t.as_dict() for t in self.turns], ensure_ascii=False)


@dataclass
class _State:
    turns: list[Turn] = field(default_factory=list)
    latest: Previous | None = None
    streak: int = 0  # consecutive valid turns that gave `latest.score`
    outcome: Outcome | None = None


def ask_with_retries(
    judge: PanelJudge,
    requests: Sequence[JudgeRequest],
    prompts: PromptSet,
    retries: int,
    on_ask: Callable[[int, int], None] | None = None,
) -> list[tuple[Verdict | None, list[str], list[str]]]:
    """Ask `judge` every request; re-ask the malformed ones up to `retries` times, in batches.

    Returns per request (verdict or None if every attempt was malformed, raw answers, errors).
    `on_ask(attempt, n_requests)` is called before each batch is sent (progress).
    """
    current = list(requests)
    answers: list[list[str]] = [[] for _ in requests]
    errors: list[list[str]] = [[] for _ in requests]
    verdicts: list[Verdict | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    for attempt in range(retries + 1):
        if not pending:
            break
        if on_ask:
            on_ask(attempt, len(pending))
        texts = judge.ask([current[i] for i in pending])
        if len(texts) != len(pending):
            raise RuntimeError(f"judge {judge.name} returned {len(texts)} answers for {len(pending)} requests")
        still = []
        for i, text in zip(pending, texts, strict=True):
            answers[i].append(text)
            try:
                verdicts[i] = parse_answer(text)
            except MalformedAnswer as err:
                errors[i].append(str(err))
                current[i] = prompts.retry(requests[i], str(err))
                still.append(i)
        pending = still
    return [(verdicts[i], answers[i], errors[i]) for i in range(len(requests))]


def run_consensus(
    cases: Sequence[Case],
    judges: Sequence[PanelJudge],
    prompts: PromptSet,
    rounds: int,
    retries: int,
    on_ask: Callable[[int, str, int, int], None] | None = None,
) -> list[Outcome]:
    """Run the protocol on every case; one `Outcome` per case, in order.

    `on_ask(round, judge_name, attempt, n_requests)` is called before each batch is sent to a
    judge, retries included (progress).
    """
    if not judges:
        raise ValueError("the panel has no judges")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    g = len(judges)
    states = [_State() for _ in cases]
    for t in range(rounds * g):
        active = [i for i, s in enumerate(states) if s.outcome is None]
        if not active:
            break
        judge = judges[t % g]
        rnd = t // g + 1
        requests = [prompts.request(cases[i], judge.role, states[i].latest, judge.prefill) for i in active]
        report = None if on_ask is None else partial(on_ask, rnd, judge.name)
        results = ask_with_retries(judge, requests, prompts, retries, on_ask=report)
        for i, (verdict, answers, errors) in zip(active, results, strict=True):
            state = states[i]
            turn = Turn(turn=t + 1, round=rnd, judge=judge.name, shown=state.latest, answers=answers, errors=errors)
            state.turns.append(turn)
            if verdict is None:
                state.streak = 0
                continue
            turn.score, turn.reason = verdict.score, verdict.reason
            agrees = state.streak > 0 and state.latest is not None and state.latest.score == verdict.score
            state.streak = state.streak + 1 if agrees else 1
            state.latest = Previous(judge=judge.name, score=verdict.score, reason=verdict.reason)
            if state.streak >= g:
                state.outcome = Outcome(score=float(verdict.score), rounds=rnd, agreed=True, turns=state.turns)
    outcomes = []
    for state in states:
        if state.outcome is None:
            history = [t.score for t in state.turns if t.score is not None]
            mean = sum(history) / len(history) if history else None
            state.outcome = Outcome(score=mean, rounds=rounds, agreed=False, turns=state.turns)
        outcomes.append(state.outcome)
    return outcomes
