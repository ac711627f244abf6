"""A multi-turn entry's earlier turns reach every reader of text alone: the judges' cases, the
rationale requests, the external writer's request and the HTML browser; a single-turn entry's
texts stay exactly what they were (so its cached judge answers stay valid)."""

from __future__ import annotations

from pathlib import Path

from pipeline.external_dispreferred import load_external_prompts
from pipeline.html_report import entry_block
from pipeline.judges.prompts import load_prompts
from pipeline.judges.rationales import add_rationales
from pipeline.judges.scoring import cases_from_rows
from pipeline.schema import question_in_context
from tests.conftest import make_rows

REPO = Path(__file__).resolve().parents[1]
CONTEXT = [{"question": "Which modality is this?", "answer": "a CT scan"},
           {"question": "Is there a mass?", "answer": "yes, in the liver"}]
IN_CONTEXT = ("Earlier in this conversation about the same image:\nQ: Which modality is this?\nA: a CT scan\n"
              "Q: Is there a mass?\nA: yes, in the liver\nNow: How large is it?")


def test_the_question_in_context():
    assert question_in_context("How large is it?", CONTEXT) == IN_CONTEXT
    assert question_in_context("How large is it? ", []) == "How large is it? "  # untouched, spaces included


def _rows(context):
    row = {**make_rows(1)[0], "question": "How large is it?", "answer": "3 cm", "context": context,
           "rejected": [{"text": "5 cm", "level": 3, "similarity": 0.9, "replaced": []}]}
    return [row]


def test_judges_see_the_earlier_turns_only_when_there_are_some():
    (case,), _ = cases_from_rows(_rows(CONTEXT))
    assert case.question == IN_CONTEXT and case.reference == "3 cm" and case.response == "5 cm"
    (plain,), _ = cases_from_rows(_rows([]))
    assert plain.question == "How large is it?"


class _RecordingJudge:
    """Records the requests and answers none (every rationale then counts as failed)."""

    prefill = False
    name = "recorder"

    def __init__(self):
        self.requests = []

    def ask_each(self, requests):
        self.requests.extend(requests)
        return [None] * len(requests), "no judge here"

    def key(self, request):
        return str(request)


def test_rationale_requests_carry_the_earlier_turns():
    prompts = load_prompts(REPO / "pipeline/judges/prompts.yaml").rationales
    judge = _RecordingJudge()
    add_rationales(_rows(CONTEXT), judge, prompts)
    users = [dict(r.messages)["user"] for r in judge.requests]
    assert len(users) == 2 and all(IN_CONTEXT in u for u in users)  # the rationale and the counterfactual


def test_the_external_writer_sees_the_earlier_turns():
    prompts = load_external_prompts(REPO / "pipeline/external_prompts.yaml")
    with_context = dict(prompts.request(_rows(CONTEXT)[0], 3, "writer", prefill=False, send_image=False).messages)
    plain = dict(prompts.request(_rows([])[0], 3, "writer", prefill=False, send_image=False).messages)
    assert IN_CONTEXT in with_context["user"] and "Earlier in this conversation" not in plain["user"]
    assert plain["user"] == with_context["user"].replace(IN_CONTEXT, "How large is it?")


def test_the_html_browser_lists_the_earlier_turns():
    row = {**_rows(CONTEXT)[0], "modality": "ct"}
    html = entry_block(1, row, {}, {})
    assert '<ol class="context"' in html and "Which modality is this?" in html and "yes, in the liver" in html
    assert html.index('<ol class="context"') < html.index('<p class="question">')
    assert '<ol class="context"' not in entry_block(1, {**row, "context": []}, {}, {})
