"""Report-generation metrics: BLEU-1..4, ROUGE-L and METEOR of generated radiology reports.

MMedPO reports BLEU-1..4, ROUGE-L and METEOR on IU-Xray and MIMIC-CXR. Its authors released no
evaluation code (neither the MMedPO repository nor MMed-RAG's has one), so these follow the code
the report-generation literature computes them with: R2Gen (cuhksz-nlp/R2Gen,
`modules/metrics.py`) and its successors (R2GenGPT, whose IU-Xray files MMedPO uses) call the COCO
caption toolkit's `Bleu(4)`, `Rouge()` and `Meteor()` on their own cleaned text, skipping the
toolkit's PTBTokenizer. We do the same, with the toolkit as published on PyPI
(`pycocoevalcap==1.2`): its BLEU and ROUGE-L are Python, its METEOR runs METEOR 1.5's jar (shipped
in the wheel) through `java`.

Why this library rather than the alternatives:

- sacrebleu + rouge-score + nltk's METEOR: BLEU agrees once tokenization is switched off, but
  rouge-score's ROUGE-L is an F1 (the toolkit's is F with beta = 1.2) and nltk's METEOR is a
  re-implementation (no paraphrase matching, other parameters), not METEOR 1.5; it also needs
  WordNet, which nltk downloads at run time (pip-installable copies exist only in small
  third-party packages). Published numbers could not be compared.
- Hugging Face `evaluate`: loads metric scripts from the hub and its METEOR downloads WordNet, so
  it does not run offline.
- pycocoevalcap needs Java for METEOR; Java 17 is on the machine image and CI's. Without `java`
  on PATH, `report_scores` raises `JavaNotFoundError` (nothing is skipped silently).

Text processing, as R2Gen does it (its `Tokenizer.clean_report_iu_xray` /
`clean_report_mimic_cxr`, reimplemented in `normalize_report`): number-list markers and repeated
periods removed, lowercased, split into sentences at ". ", quotes, slashes, backslashes and the
characters ``. , ? ; * ! % ^ & _ + ( )`` plus the range ``:`` to ``[`` (R2Gen's regex has an
unescaped ``:-\\[``, so ``< = > @`` go too) deleted, sentences joined with " . " and a final " .",
then split on whitespace. The same cleaning is applied to predictions and references (R2Gen
scores text decoded from its vocabulary, i.e. cleaned text, on both sides). Not reproduced:
R2Gen's truncation of reports to `max_seq_length` tokens (60 IU-Xray, 100 MIMIC-CXR) and its
mapping of rare words to ``<unk>``; both depend on its training vocabulary, not on the report.
Two guards of ours: "|||" is deleted from both sides (METEOR's jar reads it as a field
separator; the toolkit only strips it from predictions), and a prediction with no word left
(empty, or punctuation only, which R2Gen's cleaner turns into ".") is scored as the empty string,
so it scores 0 on every metric, as R2Gen's empty decode would. A reference with no word is an
error: no metric is defined against it.

Aggregation, as the toolkit does it (and R2Gen reports): BLEU is corpus-level (clipped n-gram
matches and lengths summed over all reports, one brevity penalty, cumulative geometric mean of
the 1..n-gram precisions, no smoothing); ROUGE-L is the mean of per-report LCS F-scores
(beta = 1.2); METEOR is the jar's corpus score from statistics summed over all reports (not the
mean of the per-report scores). All are fractions in [0, 1] (papers print them x 100).
`ReportScores.per_item` has the per-report ROUGE-L and METEOR (for bootstrap intervals); BLEU has
no per-report value that aggregates to the corpus BLEU, so an interval of BLEU resamples reports
and recomputes the corpus score.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.errors import DataError, PipelineError

Dataset = Literal["iu_xray", "mimic_cxr"]
DATASETS: tuple[str, ...] = ("iu_xray", "mimic_cxr")
METRICS: tuple[str, ...] = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor")
ITEM_METRICS: tuple[str, ...] = ("rouge_l", "meteor")

INSTALL_JAVA = "apt-get install default-jre-headless"


class JavaNotFoundError(PipelineError, RuntimeError):
    """METEOR needs a Java runtime and there is no `java` on PATH."""


class MeteorError(PipelineError, RuntimeError):
    """METEOR's jar started but did not answer (it exited, e.g. for lack of memory)."""


@dataclass(frozen=True)
class ReportScores:
    """Corpus scores (`scores`, keys `METRICS`) and per-report scores (`per_item`, keys `ITEM_METRICS`).

    All values are fractions in [0, 1]. `per_item[m][i]` scores report i; the mean of
    `per_item["rouge_l"]` is `scores["rouge_l"]`, while `scores["meteor"]` is METEOR's corpus
    score, which is not the mean of `per_item["meteor"]`.
    """

    scores: dict[str, float]
    per_item: dict[str, list[float]]


# R2Gen's sentence cleaner: its regex has the range ":-\[" (":" to "["), so "<=>?@" are deleted
# too (and capitals would be, but the text is lowercased first).
_R2GEN_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _replace_passes(text: str, old: str, new: str, passes: int) -> str:
    # R2Gen chains a fixed number of .replace calls rather than looping to a fixed point, so a
    # run of more than 2**passes characters keeps some: same number of passes, same text.
    for _ in range(passes):
        text = text.replace(old, new)
    return text


def normalize_report(text: str, dataset: Dataset) -> str:
    """`text` cleaned as R2Gen's tokenizer cleans a report of `dataset`, tokens joined by one space.

    E.g. with "mimic_cxr", "1. Heart size is normal.  2. No effusion/pneumothorax." becomes
    "heart size is normal . no effusionpneumothorax ."; "iu_xray" does not collapse the double
    space first, so its "2." marker survives as an empty sentence: "heart size is normal . . no
    effusionpneumothorax .". "|||" is deleted (METEOR's separator).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    text = text.replace("|||", "")
    if dataset == "mimic_cxr":
        text = text.replace("\n", " ")
        text = _replace_passes(text, "__", "_", 7)
        text = _replace_passes(text, "  ", " ", 6)
        text = _replace_passes(text, "..", ".", 8)
    else:
        text = _replace_passes(text, "..", ".", 3)
    text = text.replace("1. ", "")
    for marker in ("2", "3", "4", "5"):
        text = text.replace(f". {marker}. ", ". ")
    for marker in ("2", "3", "4", "5"):
        text = text.replace(f" {marker}. ", ". ")
    sentences = []
    for sentence in text.strip().lower().split(". "):
        for char in ('"', "/", "\\", "'"):
            sentence = sentence.replace(char, "")
        # R2Gen keeps empty sentences (its filter compares a str with []), hence e.g. ". ." runs.
        sentences.append(_R2GEN_PUNCT.sub("", sentence.strip().lower()))
    # R2Gen's vocabulary splits on whitespace and its decoder joins with single spaces.
    return " ".join((" . ".join(sentences) + " .").split())


def _has_words(cleaned: str) -> bool:
    return any(token != "." for token in cleaned.split())


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "METEOR needs Java: pycocoevalcap runs METEOR 1.5's jar with `java`, and there is no "
            f"`java` on PATH. Install a Java runtime (8 or newer), e.g. `{INSTALL_JAVA}` on "
            "Debian/Ubuntu, or put its bin/ folder on PATH, and run again."
        )
    return java


def _close(meteor: Meteor) -> None:
    # compute_score holds the toolkit's lock until it returns; after an exception it is never
    # released, and the toolkit's __del__ would then wait on it forever at garbage collection.
    if meteor.lock.locked():
        meteor.lock.release()
    process = meteor.meteor_p
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            # Closing stdin flushes what a dead jar never read: a broken pipe, nothing to report.
            with contextlib.suppress(OSError):
                stream.close()
    process.kill()
    process.wait()


# One jar per process, reused: starting it costs seconds (the JVM, then its paraphrase table on
# the first request) and every request after that milliseconds; its requests carry all their
# statistics, so a reused jar scores exactly as a fresh one. Keyed by the `java` it was started
# with, so a changed PATH starts another.
_meteor_lock = threading.Lock()
_meteor_jar: tuple[str, Meteor] | None = None


def _stop_meteor() -> None:
    global _meteor_jar
    with _meteor_lock:
        if _meteor_jar is not None:
            _close(_meteor_jar[1])
            _meteor_jar = None


atexit.register(_stop_meteor)


def _meteor(java: str, gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    global _meteor_jar
    with _meteor_lock:
        if _meteor_jar is not None and (_meteor_jar[0] != java or _meteor_jar[1].meteor_p.poll() is not None):
            _close(_meteor_jar[1])
            _meteor_jar = None
        if _meteor_jar is None:
            _meteor_jar = (java, Meteor())
        meteor = _meteor_jar[1]
        try:
            score, scores = meteor.compute_score(gts, res)
        except (ValueError, OSError) as e:  # an empty line from a dead jar, or a broken pipe
            _meteor_jar = None
            process = meteor.meteor_p
            process.kill()
            stderr = process.stderr.read().decode("utf-8", "replace").strip() if process.stderr else ""
            _close(meteor)
            raise MeteorError(
                f"METEOR's jar (java -Xmx2G -jar meteor-1.5.jar, with {java}) stopped answering ({e}); "
                f"its stderr: {stderr[-2000:] or '(empty)'}. It needs about 2 GB of free memory and a "
                f"working Java runtime (`java -version`; `{INSTALL_JAVA}`)."
            ) from e
    return float(score), [float(s) for s in scores]


def _coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> ReportScores:
    """The toolkit's scores of cleaned `hypotheses`, each against its list of cleaned references.

    Several references per hypothesis are allowed here (the toolkit's own setting), so the
    library's published examples can be checked; `report_scores` passes one.
    """
    java = _require_java()  # before the Python metrics, which take seconds on a large test split
    res = {i: [h] for i, h in enumerate(hypotheses)}
    gts = {i: list(refs) for i, refs in enumerate(references)}
    # verbose=0: the toolkit's default prints the n-gram counts to stdout.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    meteor, meteor_items = _meteor(java, gts, res)
    scores = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["rouge_l"] = float(rouge)
    scores["meteor"] = meteor
    return ReportScores(
        scores=scores,
        per_item={"rouge_l": [float(s) for s in rouge_items], "meteor": meteor_items},
    )


def report_scores(predictions: Sequence[str], references: Sequence[str], *, dataset: Dataset) -> ReportScores:
    """BLEU-1..4, ROUGE-L and METEOR of `predictions[i]` against `references[i]`, as R2Gen scores them.

    Both sides are cleaned with `normalize_report(text, dataset)` (R2Gen uses its IU-Xray cleaner
    for IU-Xray and its MIMIC-CXR cleaner otherwise; the two differ only in how they treat
    newlines, runs of "_", spaces and periods). A prediction with no word scores 0. Raises
    `ValueError` when the lists differ in length or are empty, `DataError` for a reference without
    words, `JavaNotFoundError` without `java` on PATH, `MeteorError` if METEOR's jar fails.
    The first call starts METEOR's jar (seconds: the JVM and its paraphrase table); later calls
    in the same process reuse it, and it is stopped at exit.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must pair up one to one: got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    if not predictions:
        raise ValueError("no reports to score: predictions and references are empty")
    for name, items in (("predictions", predictions), ("references", references)):
        bad = [i for i, item in enumerate(items) if not isinstance(item, str)]
        if bad:
            raise ValueError(
                f"{name} must be strings; not at index {bad[:5]} ({type(items[bad[0]]).__name__})"
            )

    refs = [normalize_report(r, dataset) for r in references]
    empty = [i for i, r in enumerate(refs) if not _has_words(r)]
    if empty:
        shown = ", ".join(f"{i} ({references[i]!r})" for i in empty[:5])
        raise DataError(
            f"{len(empty)} reference report(s) have no words after cleaning, at index {shown}; "
            "no metric is defined against an empty reference: fix or drop those cases"
        )
    hyps = [normalize_report(p, dataset) for p in predictions]
    hyps = [h if _has_words(h) else "" for h in hyps]
    return _coco_scores(hyps, [[r] for r in refs])
