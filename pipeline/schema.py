"""Parquet schemas of every artifact the pipeline writes, and strict readers/writers for them.

Each artifact is one Parquet file with images embedded as encoded bytes (PNG or JPEG), so an
artifact is one file, not thousands. A schema is explicit here so that every stage, and every
user's notebook, agrees on column names and types.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError, InputNotFoundError

ANSWER_TYPES = ("closed", "open")


class Turn(TypedDict):
    """One earlier question/answer pair of an entry's conversation (an item of its `context`)."""

    question: str
    answer: str


def question_in_context(question: str, context: Sequence[Turn]) -> str:
    """The question as a reader of text alone needs it (the judges, the external writer): the
    conversation's earlier turns first, then the question. Exactly `question` when there are none,
    so a single-turn entry's prompts (and their cached answers) are what they always were."""
    if not context:
        return question
    turns = "\n".join(f"Q: {turn['question'].strip()}\nA: {turn['answer'].strip()}" for turn in context)
    return f"Earlier in this conversation about the same image:\n{turns}\nNow: {question.strip()}"


# The earlier turns of a multi-turn conversation, oldest first, that the entry's question follows:
# `VLM.prompt_ids` renders them as real user/assistant turns before the question. Always a list,
# empty for a single-turn entry (docs/data-formats.md#multi-turn-conversations).
TURN_TYPE = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])
CONTEXT_TYPE = pa.list_(TURN_TYPE)

# One VQA entry: the unit of `data/prepared/{train,test}.parquet` and `data/pool.parquet`.
VQA_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # encoded PNG/JPEG bytes
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("answer_type", pa.string(), nullable=False),  # "closed" | "open"
    pa.field("modality", pa.string(), nullable=False),
    pa.field("question_type", pa.string(), nullable=False),
    pa.field("context", CONTEXT_TYPE, nullable=False),  # earlier turns; [] for a single-turn entry
]
VQA_SCHEMA = pa.schema(VQA_FIELDS)
VQA_NAMES = tuple(f.name for f in VQA_FIELDS)  # the columns every later artifact carries over from its entry

# `data/prepared/lesions.parquet`: where the lesion is, for the entries whose dataset says so (the
# phantom's drawn lesions, your masks or boxes); MMedPO's visual dispreference noises it.
LESION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the train row's id
        pa.field("mask", pa.binary(), nullable=False),  # PNG, mode L, the image's size: nonzero = lesion
        pa.field("source", pa.string(), nullable=False),  # phantom | mask | boxes
    ]
)

# `data/pool.parquet`: the entries preferences are built from, plus why each was chosen.
POOL_SCHEMA = pa.schema(
    VQA_FIELDS
    + [
        pa.field("mine_strategy", pa.string(), nullable=False),
        pa.field("mine_score", pa.float64(), nullable=True),  # hardness, where the strategy computes one
        # why the strategy chose it, where it says (hard: wrong | low-confidence | neighbour-of:<id>)
        pa.field("mine_reason", pa.string(), nullable=True),
    ]
)

# One dispreferred candidate made by `sample` (HSCR §3.1).
CANDIDATE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("level", pa.int32()),  # 1..k: how many sensitive positions were replaced
        pa.field("positions", pa.list_(pa.int32())),  # replaced positions within the answer tokens
        pa.field("original_tokens", pa.list_(pa.string())),
        pa.field("replacement_tokens", pa.list_(pa.string())),
        pa.field("logprob", pa.float64()),  # log p_sft(candidate | full image, question)
    ]
)

# MMedPO §3.1's visual dispreference of an entry: the chosen answer paired with a degraded image x*
# (noise on the lesion region, or on the whole image). Null where an entry has none.
VISUAL_DISPREFERRED_TYPE = pa.struct(
    [
        pa.field("image", pa.binary()),  # x*: encoded PNG bytes, the entry's image with noise added
        pa.field("region", pa.string()),  # what was noised: annotation | saliency | global
        pa.field("region_fraction", pa.float64()),  # share of the image's pixels noised
        pa.field("confidence", pa.float64()),  # the localizer's confidence s_v in (0, 1] (MMedPO §3.2.2)
        pa.field("weight", pa.float64()),  # s_v normalized like the judges' weights; null until `score`
    ]
)

# `data/candidates.parquet`
CANDIDATES_SCHEMA = pa.schema(
    VQA_FIELDS
    + [
        pa.field("chosen_token_ids", pa.list_(pa.int32())),
        pa.field("chosen_logprob", pa.float64()),
        pa.field("sensitivity", pa.list_(pa.float64())),  # per answer position: logit shift full - dropped
        pa.field("candidates", pa.list_(CANDIDATE_TYPE)),
        pa.field("visual_dispreferred", VISUAL_DISPREFERRED_TYPE),  # sample.visual_dispreference
    ]
)

# One dispreferred response kept by `rerank` (HSCR §3.2), in rank order (most similar first).
REJECTED_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("similarity", pa.float64()),
        pa.field("level", pa.int32()),
        pa.field("logprob", pa.float64()),
    ]
)

# `data/ranked.parquet`: `answer` is the chosen (preferred) response.
RANKED_SCHEMA = pa.schema(VQA_FIELDS + [pa.field("rejected", pa.list_(REJECTED_TYPE)),
                                        pa.field("visual_dispreferred", VISUAL_DISPREFERRED_TYPE)])

# The judges' verdict on one dispreferred response (MMedPO §3.2), aligned with `rejected`.
JUDGEMENT_TYPE = pa.struct(
    [
        pa.field("score", pa.float64()),  # null when every judge answer was missing
        pa.field("rounds", pa.int32()),
        pa.field("agreed", pa.bool_()),
        pa.field("weight", pa.float64()),
        pa.field("transcript", pa.string()),  # JSON list of every judge turn, for audit
    ]
)

# A CheXPO rationale written by a judge (`score.rationales`), with its provenance.
RATIONALE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("judge", pa.string()),  # the panel judge that wrote it
        pa.field("prompt_version", pa.string()),  # `rationales.version` of the prompts file
        pa.field("cache_key", pa.string()),  # its answer's key in the judge response cache
    ]
)

# `data/scored.parquet`
SCORED_SCHEMA = pa.schema(
    VQA_FIELDS
    + [
        pa.field("rejected", pa.list_(REJECTED_TYPE)),
        pa.field("judgements", pa.list_(JUDGEMENT_TYPE)),
        # Both null unless score.rationales is enabled; then a null rationale (or list item) is a
        # request that failed or an answer that was empty or malformed: nothing is filled in.
        pa.field("rationale", RATIONALE_TYPE),  # why the chosen answer (`answer`) is right
        pa.field("counterfactuals", pa.list_(RATIONALE_TYPE)),  # aligned with `rejected`: an argument for each
        pa.field("visual_dispreferred", VISUAL_DISPREFERRED_TYPE),  # with its `weight` set by `score`
    ]
)

# `reports/predictions/*.parquet`: one row per evaluated question.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # e.g. "sft", "sft_blind"
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("prediction", pa.string()),
        pa.field("answer_type", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("question_type", pa.string()),
        pa.field("score", pa.float64()),  # closed: 0/1 correctness; open: token recall
    ]
)


# `data/prepared/reports.parquet`: the report-generation benchmark(s), one row per case; never
# trained on (docs/benchmark.md § Report generation). A case of several images (IU-Xray's frontal
# and lateral views) keeps its first image: the models here take one image per prompt.
REPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),  # the benchmark: its metrics are keyed by it
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded PNG/JPEG bytes: the case's first image
        pa.field("prompt", pa.string(), nullable=False),  # the instruction the model answers
        pa.field("report", pa.string(), nullable=False),  # the reference report
        pa.field("modality", pa.string(), nullable=False),
        # R2Gen's text cleaner the metrics apply (pipeline.report_metrics.DATASETS): iu_xray | mimic_cxr
        pa.field("cleaning", pa.string(), nullable=False),
    ]
)

# `reports/report_predictions/*.parquet`: one row per generated report, with its per-report scores.
REPORT_PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # e.g. "sft", "sft_blind"
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("report", pa.string()),  # the reference
        pa.field("prediction", pa.string()),
        pa.field("rouge_l", pa.float64()),  # per-report ROUGE-L (the benchmark's score is their mean)
        pa.field("meteor", pa.float64()),  # per-report METEOR (the benchmark's is the corpus score)
    ]
)


class SchemaError(DataError):
    """An artifact does not match the schema a stage expects."""


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema) -> None:
    """Cast `table` to `schema` and write it atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"{path}: missing columns {missing}")
    table = table.select(schema.names).cast(schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_rows(rows: list[dict], path: str | Path, schema: pa.Schema) -> None:
    """Write a list of row dicts with `schema` (see `write_table`)."""
    write_table(pa.Table.from_pylist(rows, schema=schema), path, schema)


def read_table(path: str | Path, schema: pa.Schema) -> pa.Table:
    """Read an artifact and check it carries every column of `schema` with the right type."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(
            f"{path}: file not found; run the upstream stage that writes it first (`dvc repro`)"
        )
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(
            f"{path}: the file is empty (0 bytes), expected a Parquet table; re-create it by "
            "re-running the stage that writes it (`dvc repro`)"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid/ArrowIOError on a corrupt file
        raise DataError(
            f"{path}: not a readable Parquet file ({e}); it is corrupt or truncated: re-create it by "
            "re-running the stage that writes it (`dvc repro`)"
        ) from e
    fix = "is it the right file? If so, re-create it with the current code (`dvc repro`)"
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{path}: missing column {field.name!r}; {fix}")
        have = table.schema.field(field.name).type
        if have != field.type:
            raise SchemaError(f"{path}: column {field.name!r} is {have}, expected {field.type}; {fix}")
    return table.select(schema.names)


def read_rows(path: str | Path, schema: pa.Schema) -> list[dict]:
    """Read an artifact as a list of row dicts (see `read_table`)."""
    return read_table(path, schema).to_pylist()


def require_rows(rows: list[dict], path: str | Path) -> list[dict]:
    """`rows` if there is at least one; a stage cannot do anything with an empty input."""
    if not rows:
        raise DataError(
            f"{path}: has no rows; check the report of the stage that writes it (reports/*.json) and re-run it"
        )
    return rows
