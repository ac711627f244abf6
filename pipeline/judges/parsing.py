"""Strict reading of a judge's answer: exactly one JSON object {"score": int 0..10, "reason": str}.

Anything else is malformed and raises `MalformedAnswer`; the protocol then retries the judge and
finally records the turn as missing. Nothing is repaired or guessed: a score of "7.5", "7/10",
"seven" or true is malformed, not 7. Tolerated around the object, because chat models add them
without changing what they say: surrounding prose or a ``` fence, and a stray closing brace that a
stop-at-"}" decode may leave behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SCORE_MIN, SCORE_MAX = 0, 10
_KEYS = {"score", "reason"}


class MalformedAnswer(ValueError):
    """A judge's answer is not exactly one valid verdict object."""


@dataclass(frozen=True)
class Verdict:
    score: int
    reason: str


def parse_answer(text: str) -> Verdict:
    """Parse a judge's raw answer, or raise `MalformedAnswer` saying why."""
    start = text.find("{")
    if start < 0:
        raise MalformedAnswer("no JSON object in the answer")
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as err:
        raise MalformedAnswer(f"invalid JSON: {err.msg}") from None
    if "{" in text[end:]:
        raise MalformedAnswer("more than one JSON object in the answer")
    if not isinstance(obj, dict):
        raise MalformedAnswer("the JSON value is not an object")
    if set(obj) != _KEYS:
        raise MalformedAnswer(f"expected exactly the keys {sorted(_KEYS)}, got {sorted(obj)}")
    score, reason = obj["score"], obj["reason"]
    # bool is a subclass of int in Python: `true` must not read as 1.
    if isinstance(score, bool) or not isinstance(score, int):
        raise MalformedAnswer(f"score must be an integer, got {score!r}")
    if not SCORE_MIN <= score <= SCORE_MAX:
        raise MalformedAnswer(f"score must be in {SCORE_MIN}..{SCORE_MAX}, got {score}")
    if not isinstance(reason, str):
        raise MalformedAnswer(f"reason must be a string, got {type(reason).__name__}")
    return Verdict(score=score, reason=reason.strip())
