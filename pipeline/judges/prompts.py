"""Loading the versioned prompt file (`prompts.yaml`) and rendering judge requests from it (verdicts,
and the rationales of `score.rationales`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

from pipeline.errors import InputNotFoundError, ParamsError
from pipeline.judges.judge import JudgeRequest

_CASE_FIELDS = {"question", "reference", "response"}
_PREVIOUS_FIELDS = {"previous_judge", "previous_score", "previous_reason"}
_REQUIRED = {  # template: (placeholders it must use, placeholders it may use)
    "first_turn": (_CASE_FIELDS, _CASE_FIELDS),
    "followup_turn": (_CASE_FIELDS | {"previous_score"}, _CASE_FIELDS | _PREVIOUS_FIELDS),
    "retry_turn": (set(), {"error"}),
}
# The optional `rationales:` section (CheXPO counterfactual rationales, pipeline/judges/rationales.py).
# $answer is the answer the text argues for: the chosen one (rationale), a dispreferred one
# (counterfactual, which may also name the chosen one, $reference).
_RATIONALE_REQUIRED = {
    "rationale_turn": ({"question", "answer"}, {"question", "answer"}),
    "counterfactual_turn": ({"question", "answer"}, {"question", "answer", "reference"}),
    "prefill": (set(), {"answer"}),
}


class PromptFileError(ParamsError):
    """The prompt file is missing a part or uses an unknown placeholder."""


@dataclass(frozen=True)
class Case:
    """One dispreferred response to judge, with its context (the image is not shown: MMedPO §3.2.1)."""

    question: str
    reference: str  # the preferred answer
    response: str  # the dispreferred answer


@dataclass(frozen=True)
class Previous:
    """The score the next judge is shown: the latest valid one in the response's history."""

    judge: str
    score: int
    reason: str


def _identifiers(template: Template, where: str) -> set[str]:
    names = set()
    for match in template.pattern.finditer(template.template):
        if match.group("invalid") is not None:
            raise PromptFileError(f"{where}: invalid `$` placeholder (write $$ for a literal $)")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


@dataclass(frozen=True)
class RationalePrompts:
    """The `rationales:` section: one system message, the two user turns and a prefill. Its
    `version` is its own (it is in the rationales' cache key and provenance), so editing these
    texts leaves the cached verdicts valid."""

    version: str
    system: str
    rationale_turn: Template  # why the chosen answer ($answer) is right
    counterfactual_turn: Template  # an argument for a dispreferred answer ($answer; $reference: the chosen one)
    prefill: Template  # hf judges with `prefill: true` continue this text ("" for none)

    def _request(self, user: str, answer: str, prefill: bool) -> JudgeRequest:
        start = self.prefill.substitute(answer=answer) if prefill else ""
        return JudgeRequest(messages=(("system", self.system), ("user", user)), prefill=start)

    def rationale(self, question: str, answer: str, prefill: bool) -> JudgeRequest:
        """Why `answer` (the chosen one) is the right answer to `question`."""
        user = self.rationale_turn.substitute(question=question, answer=answer)
        return self._request(user, answer, prefill)

    def counterfactual(self, question: str, answer: str, reference: str, prefill: bool) -> JudgeRequest:
        """An argument for `answer`, a dispreferred answer (`reference`: the chosen one)."""
        user = self.counterfactual_turn.substitute(question=question, answer=answer, reference=reference)
        return self._request(user, answer, prefill)


@dataclass(frozen=True)
class PromptSet:
    version: Any
    roles: dict[str, str]
    rubric: str
    first_turn: Template
    followup_turn: Template
    retry_turn: Template
    prefill: str
    path: str
    rationales: RationalePrompts | None = None  # None: the file has no `rationales:` section

    def request(self, case: Case, role: str, previous: Previous | None, prefill: bool) -> JudgeRequest:
        """The request for one judge turn: a fresh verdict, or a verdict on the previous judge's score."""
        if role not in self.roles:
            raise PromptFileError(f"{self.path}: no role {role!r} (roles: {sorted(self.roles)})")
        values = {"question": case.question, "reference": case.reference, "response": case.response}
        if previous is None:
            user = self.first_turn.substitute(values)
        else:
            user = self.followup_turn.substitute(
                values, previous_judge=previous.judge, previous_score=str(previous.score),
                previous_reason=previous.reason or "(none given)",
            )
        # Everything shared by all requests comes first (system): prefix caching reuses it.
        messages = (("system", f"{self.roles[role]}\n\n{self.rubric}"), ("user", user))
        return JudgeRequest(messages=messages, prefill=self.prefill if prefill else "")

    def retry(self, request: JudgeRequest, error: str) -> JudgeRequest:
        """Re-ask after a malformed answer: the original turn with a correction naming the error.

        The correction is appended to the last user message rather than sent after the bad answer
        as a new turn: small models otherwise copy their bad answer verbatim. The request differs
        from the first, so a deterministic (greedy) judge can answer differently, and the retry
        has a cache key of its own.
        """
        *head, (role, content) = request.messages
        if role != "user":
            raise ValueError(f"the last message of a judge request must be the user's, got {role!r}")
        note = self.retry_turn.substitute(error=error)
        messages = (*head, ("user", f"{content}\n\n{note}"))
        return JudgeRequest(messages=messages, prefill=request.prefill)


def read_prompt_file(path: str | Path, param: str) -> dict[str, Any]:
    """The mapping in a YAML prompt file; `param` names the params.yaml key that points to it."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"prompt file {path} not found ({param} in params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise PromptFileError(f"{path}: not valid YAML: {exc}".replace("<unicode string>", str(path))) from None
    if not isinstance(raw, dict):
        raise PromptFileError(f"{path}: expected a mapping")
    return raw


def check_keys(raw: dict, needed: set[str], where: str, optional: frozenset[str] = frozenset()) -> None:
    """Every `needed` key present, nothing beyond `needed` and `optional`."""
    missing, unknown = sorted(needed - set(raw)), sorted(set(raw) - needed - optional)
    if missing:
        raise PromptFileError(f"{where}: missing key(s) {missing}")
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {unknown}")


def check_texts(raw: dict, keys: Sequence[str], where: str) -> None:
    for key in keys:
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise PromptFileError(f"{where}: `{key}` must be a non-empty string")


def check_roles(raw: dict, where: str) -> dict[str, str]:
    """`roles`: role name -> its non-empty system prompt."""
    roles = raw["roles"]
    if not isinstance(roles, dict) or not roles or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in roles.items()
    ):
        raise PromptFileError(f"{where}: `roles` must map role names to non-empty system prompts")
    return dict(roles)


def check_version(raw: dict, where: str) -> str:
    version = raw["version"]
    if isinstance(version, bool) or not isinstance(version, (str, int)) or not str(version).strip():
        raise PromptFileError(f"{where}: `version` must be a non-empty string or an integer")
    return str(version)


def load_prompts(path: str | Path) -> PromptSet:
    """Read and validate a prompt file (see pipeline/judges/prompts.yaml for the format)."""
    path = Path(path)
    raw = read_prompt_file(path, "score.prompts")
    check_keys(raw, {"version", "roles", "rubric", "first_turn", "followup_turn", "retry_turn"}, str(path),
               optional=frozenset({"prefill", "rationales"}))
    roles = check_roles(raw, str(path))
    check_texts(raw, ("rubric", "first_turn", "followup_turn", "retry_turn"), str(path))
    templates = check_templates(raw, _REQUIRED, str(path))
    prefill = raw.get("prefill", "")
    if not isinstance(prefill, str):
        raise PromptFileError(f"{path}: `prefill` must be a string")
    return PromptSet(
        version=raw["version"],
        roles=roles,
        rubric=raw["rubric"],
        first_turn=templates["first_turn"],
        followup_turn=templates["followup_turn"],
        retry_turn=templates["retry_turn"],
        prefill=prefill,
        path=str(path),
        rationales=_rationale_prompts(raw["rationales"], path) if "rationales" in raw else None,
    )


def check_templates(raw: dict, spec: dict[str, tuple[set[str], set[str]]], where: str) -> dict[str, Template]:
    """The `spec` keys of `raw` as templates: spec[key] = (placeholders required, placeholders allowed)."""
    templates = {}
    for key, (required, allowed) in spec.items():
        template = Template(raw[key])
        names = _identifiers(template, f"{where}: {key}")
        if names - allowed:
            raise PromptFileError(f"{where}: {key} uses unknown placeholder(s) {sorted(names - allowed)}")
        if required - names:
            raise PromptFileError(f"{where}: {key} must use placeholder(s) {sorted(required - names)}")
        templates[key] = template
    return templates


def _rationale_prompts(raw: Any, path: Path) -> RationalePrompts:
    where = f"{path}: rationales"
    if not isinstance(raw, dict):
        raise PromptFileError(f"{where}: expected a mapping")
    check_keys(raw, {"version", "system", *_RATIONALE_REQUIRED}, where)
    check_texts(raw, ("system", "rationale_turn", "counterfactual_turn"), where)
    if not isinstance(raw["prefill"], str):
        raise PromptFileError(f"{where}: `prefill` must be a string ('' for none)")
    version = check_version(raw, where)
    templates = check_templates(raw, _RATIONALE_REQUIRED, where)
    return RationalePrompts(version=version, system=raw["system"], rationale_turn=templates["rationale_turn"],
                            counterfactual_turn=templates["counterfactual_turn"], prefill=templates["prefill"])
