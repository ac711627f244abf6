"""Ingesting real medical VQA datasets (VQA-RAD, SLAKE, PathVQA, ...) from local files into VQA_SCHEMA rows.

Accepted inputs (see docs/data-formats.md for the full field list):

* LLaVA-Med style JSON (a list of objects) or JSONL (one object per line), with images as files
  resolved against an `image_root` directory; questions either as flat fields or as a LLaVA
  ``conversations`` list of alternating human/gpt turns (one entry per record with
  ``turns="first"``, one per question with ``turns="all"``, the earlier turns as its ``context``).
* Parquet as dataset hubs publish it, with images embedded (a ``{bytes, path}`` struct or a binary
  column) or referenced by path.

Every image is decoded (`pipeline.data.images.load_image`, DICOM included) and re-encoded as PNG.
Bad rows are never dropped silently: by default they make `ingest` raise an `IngestError` listing
them; with ``skip_bad=True`` they are left out and every one is listed in `IngestResult.skipped`
(a `SkippedRow` each). Duplicate ids and a dataset without usable rows are errors either way.

Errors are `pipeline.errors` expected failures: `IngestError` (a `DataError`) for a bad file, and
`InputNotFoundError` for a missing file or image_root; each message names the file (and row) and
says what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import pyarrow.parquet as pq

from pipeline.data.images import ImageError, encode_png, load_image
from pipeline.errors import DataError, InputNotFoundError

FORMATS = ("json", "jsonl", "parquet")
SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Field names, in precedence order: the first one present (and not null) in a row is used.
ID_FIELDS = ("qid", "question_id", "id")
IMAGE_FIELDS = ("image", "img_name", "image_name")
QUESTION_FIELDS = ("question", "text")
# Ground truth before model-written answers: LLaVA-Med eval files may carry both.
ANSWER_FIELDS = ("answer", "gt_answer", "gpt4_answer")
ANSWER_TYPE_FIELD = "answer_type"
MODALITY_FIELDS = ("modality",)
QUESTION_TYPE_FIELDS = ("question_type", "content_type")
CONVERSATION_FIELD = "conversations"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
IMAGE_PLACEHOLDER = "<image>"
UNKNOWN = "unknown"

# Raw answer_type values (lower-cased, stripped) and what they mean in VQA_SCHEMA.
ANSWER_TYPE_MAP = {
    "closed": "closed",
    "yes/no": "closed",
    "yes_no": "closed",
    "yesno": "closed",
    "open": "open",
}
YES_NO = ("yes", "no")

MAX_LISTED = 5  # rows named per problem in an error message
MAX_VALUES_LISTED = 20  # values of a `where` field named in an error message

Turns = Literal["first", "all"]
TURNS = ("first", "all")

# What each format should hold, for messages about empty files.
_FIELDS_HINT = "each with an image, a question and an answer (see docs/data-formats.md)"
EXPECTED = {
    "json": f"expected a JSON list of question objects, {_FIELDS_HINT}",
    "jsonl": f"expected one JSON question object per line, {_FIELDS_HINT}",
    "parquet": f"expected a Parquet table with one row per question, {_FIELDS_HINT}",
}


class IngestError(DataError):
    """An input file cannot be turned into a valid VQA dataset."""


class SkippedRow(TypedDict):
    """One row left out by ``skip_bad=True``, ready to be written to a report (JSON/JSONL/CSV)."""

    file: str  # the input file
    row: str  # where the row is in the file: "index 3" (JSON), "line 4" (JSONL), "row 3" (Parquet)
    id: str | None  # the row's id as written in the file; None when it has none or was unparseable
    reason: str  # every problem of the row, "kind: detail; kind: detail"


@dataclass(frozen=True)
class RowFilter:
    """Keep only the records whose `field` is one of `values` (compared as text, exactly)."""

    field: str
    values: tuple[str, ...]


@dataclass
class IngestResult:
    """VQA_SCHEMA rows (images as PNG bytes, ids unique) and every skipped row with its reasons.

    `excluded`: records left out because `where` does not select them (not bad rows);
    `turns_left_out`: question/answer pairs after the first of a conversation, not made into
    entries because ``turns="first"``.
    """

    rows: list[dict[str, Any]]
    skipped: list[SkippedRow] = field(default_factory=list)
    excluded: int = 0
    turns_left_out: int = 0


@dataclass
class _Record:
    index: int  # position among the file's records, used for generated ids
    where: str  # "index 3" / "line 4" / "row 3": how a user finds the row in the file
    data: dict[str, Any] | None
    problem: str | None = None  # set when the record could not even be parsed
    located: bool = False  # `problem` names its own position (e.g. "line 3, column 17: ...")


@dataclass
class _Issue:
    kind: str
    label: str
    detail: str


def detect_format(source: Path) -> str:
    """The format implied by `source`'s suffix (.json, .jsonl/.ndjson, .parquet)."""
    fmt = SUFFIX_FORMATS.get(source.suffix.lower())
    if fmt is None:
        raise IngestError(
            f"{source}: cannot tell the format from the suffix {source.suffix!r}; "
            f"name the file *.json/*.jsonl/*.parquet or set `format` to one of {list(FORMATS)}"
        )
    return fmt


def ingest(
    source: str | Path,
    fmt: str | None,
    image_root: str | Path | None,
    split: str,
    dataset: str,
    skip_bad: bool,
    *,
    turns: Turns,
    where: RowFilter | None = None,
) -> IngestResult:
    """Read a VQA file into VQA_SCHEMA rows with PNG-encoded images.

    `fmt` is "json", "jsonl" or "parquet" (None: from the suffix). Image paths in the file are
    resolved against `image_root` (None: the directory holding `source`). Rows without an id get
    ``f"{split}-{index:06d}"``, but only when the file has no id field at all. Raises `IngestError`
    naming the file and the offending rows for any bad row unless `skip_bad` (then every skipped
    row is in `IngestResult.skipped`), and always for duplicate ids, an empty file or when no row
    is left; `InputNotFoundError` when `source` or `image_root` does not exist.

    A LLaVA ``conversations`` record gives one entry (its first question, ``turns="first"``) or one
    per question (``turns="all"``: the k-th, k >= 1, has id ``<id>-t<k>`` and the k earlier pairs
    as its `context`). Records that share an ``id`` (LLaVA-Med's instruction files, where ``id``
    names the image) are told apart by their order: the n-th, n >= 1, gets ``<id>-r<n>``.
    `where` keeps only the records it selects (`IngestResult.excluded` counts the others); a field
    that no record has, or a value that none has, is an error.
    """
    source = Path(source)
    if turns not in TURNS:
        raise IngestError(f"{source}: turns must be one of {list(TURNS)}, got {turns!r} (prepare.files.turns)")
    if not split or not dataset:
        raise IngestError(
            f"{source}: `split` and `dataset` must be non-empty (got {split!r}, {dataset!r}); "
            "give the dataset a name (prepare.files.dataset in params.yaml)"
        )
    if source.is_dir():
        raise IngestError(
            f"{source}: is a directory; point `path` at one .json/.jsonl/.parquet file "
            "(concatenate Parquet shards into one file first)"
        )
    if not source.is_file():
        raise InputNotFoundError(
            f"{source}: file not found; check the path (prepare.files in params.yaml) and that the "
            "dataset has been put there (see docs/data-formats.md)"
        )
    fmt = detect_format(source) if fmt is None else fmt
    if fmt not in FORMATS:
        raise IngestError(f"{source}: unknown format {fmt!r}; set `format` to one of {list(FORMATS)} or null")
    root = source.parent if image_root is None else Path(image_root)
    if not root.is_dir():
        fix = "set `image_root` to the folder the image paths are relative to (null: the file's folder)"
        if not root.exists():
            raise InputNotFoundError(f"{source}: image_root {root} is not a directory (it does not exist); {fix}")
        raise IngestError(f"{source}: image_root {root} is not a directory; {fix}")

    records = list(_read_records(source, fmt))
    if not records:  # the readers already reject empty files; this guards a new reader
        raise IngestError(f"{source}: the file has no rows; {EXPECTED[fmt]}")
    keys = set().union(*(r.data.keys() for r in records if r.data is not None))
    _check_structure(source, keys)
    has_ids = any(k in keys for k in ID_FIELDS)
    has_answer_types = ANSWER_TYPE_FIELD in keys
    excluded = 0
    if where is not None:
        records, excluded = _select(source, records, keys, where, split)

    file_ids = [_row_id(r, has_ids, split) for r in records]
    ids = _record_ids(source, records, file_ids)

    rows: list[dict[str, Any]] = []
    issues: list[_Issue] = []
    skipped: list[SkippedRow] = []
    cache: dict[str, bytes | str] = {}
    turns_left_out = 0
    entry_at: dict[str, str] = {}  # entry id -> where it comes from, to catch a suffixed id that collides
    for record, row_id, file_id in zip(records, ids, file_ids, strict=True):
        label = f"{file_id} ({record.where})" if isinstance(file_id, str) else record.where
        entries, row_issues, left_out = _build_entries(
            record, row_id, label, root, split, dataset, has_answer_types, turns, where, cache
        )
        # Drop the raw record (it may hold image bytes) as soon as it is converted.
        record.data = None
        if row_issues:
            issues.extend(row_issues)
            skipped.append(
                SkippedRow(
                    file=str(source),
                    row=record.where,
                    id=file_id if has_ids else None,  # generated ids are not in the file
                    reason="; ".join(f"{i.kind}: {i.detail}" for i in row_issues),
                )
            )
            continue
        for k, entry in enumerate(entries):
            at = record.where if k == 0 else f"question {k} of the conversation at {record.where}"
            if entry["id"] in entry_at:
                raise IngestError(
                    f"{source}: entry id {entry['id']!r} is given twice: to {entry_at[entry['id']]} and to {at} "
                    "(ids `<id>-t<k>` and `<id>-r<n>` are made for later questions of a conversation and for "
                    "records sharing an id); rename the id in the file"
                )
            entry_at[entry["id"]] = at
        rows.extend(entries)
        turns_left_out += left_out

    if issues and not skip_bad:
        raise IngestError(
            f"{source}: {len(skipped)} of {len(records)} rows are bad; fix them, or set "
            f"skip_bad: true to leave them out (each one is then reported):\n{_summarize(issues)}"
        )
    if not rows:
        raise IngestError(
            f"{source}: no usable rows: all {len(records)} rows are bad; fix the file (is `image_root` "
            f"right?):\n{_summarize(issues)}"
        )
    return IngestResult(rows=rows, skipped=skipped, excluded=excluded, turns_left_out=turns_left_out)


def _read_records(source: Path, fmt: str) -> Iterator[_Record]:
    if fmt == "json":
        yield from _read_json(source)
    elif fmt == "jsonl":
        yield from _read_jsonl(source)
    else:
        yield from _read_parquet(source)


def _read_text(source: Path, fmt: str) -> str:
    """The file as text (a UTF-8 byte-order mark, as Windows tools write, is dropped); never empty."""
    try:
        text = source.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{source}: not UTF-8 text ({e}); re-save the file as UTF-8") from e
    if not text.strip():
        raise IngestError(f"{source}: the file is empty; {EXPECTED[fmt]}")
    return text


def _read_json(source: Path) -> Iterator[_Record]:
    try:
        data = json.loads(_read_text(source, "json"))
    except json.JSONDecodeError as e:
        fix = "one object per line? set `format: jsonl`" if e.msg == "Extra data" else "fix the file (is it truncated?)"
        raise IngestError(f"{source}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); {fix}") from e
    if not isinstance(data, list):
        kind = type(data).__name__
        raise IngestError(
            f"{source}: {EXPECTED['json']}; got a {kind} (a list under a key? save that list as the file)"
        )
    if not data:
        raise IngestError(f"{source}: the file has no rows (an empty JSON list); {EXPECTED['json']}")
    for i, item in enumerate(data):
        yield _as_record(i, f"index {i}", item)


def _read_jsonl(source: Path) -> Iterator[_Record]:
    # Lines end at "\n" only (a "\r" before it is JSON whitespace): str.splitlines would also split
    # inside strings at U+2028 and other characters JSON allows unescaped.
    lines = _read_text(source, "jsonl").split("\n")
    index = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) separate nothing in JSONL
        where = f"line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            # One line per document: the error's column is the column within this file line.
            problem = f"{where}, column {e.colno}: invalid JSON ({e.msg})"
            yield _Record(index, where, None, problem, located=True)
        else:
            yield _as_record(index, where, item)
        index += 1


def _read_parquet(source: Path) -> Iterator[_Record]:
    if source.stat().st_size == 0:
        raise IngestError(f"{source}: the file is empty (0 bytes); {EXPECTED['parquet']}")
    fix = "re-download or re-export it (a truncated download?), or set `format` if it is not Parquet"
    try:
        file = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
        raise IngestError(f"{source}: not a readable Parquet file ({e}); {fix}") from e
    if file.metadata.num_rows == 0:
        raise IngestError(f"{source}: the file has no rows; {EXPECTED['parquet']}")
    index = 0
    # Batches avoid holding the whole Arrow table and its Python copy (image bytes included) at once.
    batches = file.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt data page surfaces only when it is read
            raise IngestError(f"{source}: row {index} onwards: cannot read the Parquet data ({e}); {fix}") from e
        if batch is None:
            return
        for item in batch.to_pylist():
            yield _Record(index, f"row {index}", item)
            index += 1


def _as_record(index: int, where: str, item: Any) -> _Record:
    if not isinstance(item, dict):
        return _Record(index, where, None, f"expected an object, got {type(item).__name__}")
    return _Record(index, where, item)


def _check_structure(source: Path, keys: set[str]) -> None:
    """Fail once, clearly, when the file lacks a field entirely (rather than once per row)."""
    missing = []
    if not any(k in keys for k in IMAGE_FIELDS):
        missing.append(f"an image field ({' / '.join(IMAGE_FIELDS)})")
    if not any(k in keys for k in QUESTION_FIELDS) and CONVERSATION_FIELD not in keys:
        missing.append(f"a question field ({' / '.join(QUESTION_FIELDS)} / {CONVERSATION_FIELD})")
    if not any(k in keys for k in ANSWER_FIELDS) and CONVERSATION_FIELD not in keys:
        missing.append(f"an answer field ({' / '.join(ANSWER_FIELDS)} / {CONVERSATION_FIELD})")
    if missing:
        raise IngestError(
            f"{source}: no row has {', '.join(missing)}; fields found: {sorted(keys) or 'none'}; "
            "rename the fields (accepted names: docs/data-formats.md)"
        )


def _first(data: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if data.get(name) is not None:
            return data[name]
    return None


def _row_id(record: _Record, has_ids: bool, split: str) -> str | None:
    """The row's id, or None when it has none although the file has ids, or could not be parsed (bad rows)."""
    if record.data is None:
        return None
    if not has_ids:
        return f"{split}-{record.index:06d}"
    value = _first(record.data, ID_FIELDS)
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    return text or None


def _select(source: Path, records: list[_Record], keys: set[str], where: RowFilter, split: str
            ) -> tuple[list[_Record], int]:
    """The records `where` selects, plus those it cannot judge (unparseable, or without the field:
    kept so they are reported as bad rows), and how many it leaves out."""
    param = f"prepare.files.{split}.where"
    if where.field not in keys:
        raise IngestError(
            f"{source}: `where` selects rows on the field {where.field!r}, which no row has; fields found: "
            f"{sorted(keys)}; set {param}.field to one of them (or {param}: null)"
        )
    found = {text for r in records if r.data is not None
             for text in [_text(r.data.get(where.field))] if text is not None}
    unknown = [v for v in where.values if v not in found]
    if unknown:
        shown = sorted(found)[:MAX_VALUES_LISTED]
        more = f" and {len(found) - MAX_VALUES_LISTED} more" if len(found) > MAX_VALUES_LISTED else ""
        raise IngestError(
            f"{source}: `where` keeps rows whose {where.field!r} is one of {list(where.values)}, but no row has "
            f"{unknown}; values found: {shown}{more}; fix {param}.values (values are compared exactly, as text)"
        )
    wanted = set(where.values)
    kept = []
    for record in records:
        value = None if record.data is None else _text(record.data.get(where.field))
        if value is None or value in wanted:
            kept.append(record)
    return kept, len(records) - len(kept)


def _shares_image_id(record: _Record) -> bool:
    """Whether the record's id is LLaVA's `id` of a conversation: the id of its image, which several
    conversations about one image share (LLaVA-Med's instruction files)."""
    data = record.data
    return (data is not None and data.get(CONVERSATION_FIELD) is not None
            and all(data.get(name) is None for name in ID_FIELDS if name != "id"))


def _record_ids(source: Path, records: list[_Record], ids: list[str | None]) -> list[str | None]:
    """Each record's id: the file's, with `-r<n>` added to the n-th (n >= 1, in file order) of the
    conversations that share an image id. Any other repeated id is an error (skip_bad or not)."""
    where: dict[str, list[int]] = {}
    for i, row_id in enumerate(ids):
        if row_id is not None:
            where.setdefault(row_id, []).append(i)
    out = list(ids)
    dups = {}
    for row_id, positions in where.items():
        if len(positions) == 1:
            continue
        group = [records[i] for i in positions]
        images = [_first(r.data, IMAGE_FIELDS) if r.data is not None else None for r in group]
        if all(_shares_image_id(r) for r in group) and all(image == images[0] for image in images):
            for n, i in enumerate(positions[1:], start=1):
                out[i] = f"{row_id}-r{n}"
        else:
            dups[row_id] = [records[i].where for i in positions]
    if dups:
        shown = "; ".join(f"{k!r} at {', '.join(v)}" for k, v in list(dups.items())[:MAX_LISTED])
        more = f"; and {len(dups) - MAX_LISTED} more" if len(dups) > MAX_LISTED else ""
        raise IngestError(
            f"{source}: {len(dups)} duplicate ids (ids must be unique; skip_bad does not skip these): "
            f"{shown}{more}; fix or remove the duplicates (only LLaVA `conversations` records about the same "
            "image may share an `id`, their image's)"
        )
    return out


def _text(value: Any) -> str | None:
    """A field as text: strings stripped, numbers (VQA-RAD has numeric answers) written out."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def _conversation_pairs(data: dict[str, Any]) -> tuple[list[tuple[Any, Any]] | None, str | None]:
    """The (question, answer) pairs of a LLaVA `conversations` list, in order, or the problem that
    makes it unusable: turns must alternate human, gpt, ... from a human turn to a gpt turn, and
    only the first human turn may carry the image placeholder. (None, None) without the field."""
    turns = data.get(CONVERSATION_FIELD)
    if turns is None:
        return None, None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, f"`{CONVERSATION_FIELD}` must be a list of {{from, value}} objects"
    if not turns:
        return None, f"`{CONVERSATION_FIELD}` is empty"
    for i, turn in enumerate(turns):
        role = str(turn.get("from", "")).strip().lower()
        kind = "human" if role in HUMAN_ROLES else "gpt" if role in GPT_ROLES else None
        if kind is None:
            return None, (f"`{CONVERSATION_FIELD}[{i}]` is from {turn.get('from')!r}; expected one of "
                          f"{[*HUMAN_ROLES, *GPT_ROLES]}")
        expected = "human" if i % 2 == 0 else "gpt"
        if kind != expected:
            return None, (f"`{CONVERSATION_FIELD}[{i}]` is a {kind} turn where a {expected} turn was expected; "
                          "turns must alternate human, gpt, human, gpt, ... starting with human")
        value = turn.get("value")
        if i > 0 and isinstance(value, str) and IMAGE_PLACEHOLDER in value:
            return None, (f"`{CONVERSATION_FIELD}[{i}]` has the image placeholder {IMAGE_PLACEHOLDER}; only the "
                          "first human turn may (the image belongs to the first question)")
    if len(turns) % 2:
        return None, (f"`{CONVERSATION_FIELD}` ends on a human turn ({CONVERSATION_FIELD}[{len(turns) - 1}]) "
                      "that no gpt turn answers")
    return [(turns[i].get("value"), turns[i + 1].get("value")) for i in range(0, len(turns), 2)], None


def _qa_pairs(data: dict[str, Any], bad: Callable[[str, str], None]) -> list[tuple[Any, Any]]:
    """The record's raw (question, answer) pairs: the flat fields, else the conversation's pairs; a
    conversation of one pair fills in whichever flat field is missing."""
    raw_q = _first(data, QUESTION_FIELDS)
    raw_a = _first(data, ANSWER_FIELDS)
    if raw_q is not None and raw_a is not None:
        return [(raw_q, raw_a)]
    pairs, problem = _conversation_pairs(data)
    if problem:
        bad("invalid row", problem)
        return []
    if pairs is None:
        return [(raw_q, raw_a)]
    if len(pairs) == 1:
        conv_q, conv_a = pairs[0]
        return [(conv_q if raw_q is None else raw_q, conv_a if raw_a is None else raw_a)]
    if raw_q is not None or raw_a is not None:
        name = "question" if raw_q is not None else "answer"
        bad("invalid row", f"a flat {name} field beside a `{CONVERSATION_FIELD}` of {len(pairs)} questions: "
            "which one is it? Keep either the flat fields or the conversation")
        return []
    return pairs


def _build_entries(
    record: _Record,
    row_id: str | None,
    label: str,
    root: Path,
    split: str,
    dataset: str,
    has_answer_types: bool,
    turns: Turns,
    where: RowFilter | None,
    cache: dict[str, bytes | str],
) -> tuple[list[dict[str, Any]], list[_Issue], int]:
    """The record's entries (one per question used), its problems, and how many of its questions
    `turns` leaves out. A record is good or bad as a whole, whatever `turns` uses of it."""
    if record.data is None:
        # A problem that names its own position ("line 3, column 17: ...") needs no label.
        return [], [_Issue("invalid row", "" if record.located else label, record.problem or "unparseable")], 0
    data = record.data
    issues: list[_Issue] = []

    def bad(kind: str, detail: str) -> None:
        issues.append(_Issue(kind, label, detail))

    if row_id is None:
        bad("missing id", f"none of {list(ID_FIELDS)} is set")
    if where is not None and _text(data.get(where.field)) is None:
        bad("missing filter field", f"`where` selects on {where.field!r}, which this row does not set as text "
            f"({data.get(where.field)!r})")

    raw_pairs = _qa_pairs(data, bad)
    multi = len(raw_pairs) > 1
    pairs: list[tuple[str, str]] = []
    for k, (raw_q, raw_a) in enumerate(raw_pairs):
        at = f" in {CONVERSATION_FIELD}[{2 * k}]" if multi else ""
        question = _text(raw_q)
        if question is not None:
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        if not question:
            bad("empty question",
                ("no question text" if raw_q is None or question == "" else f"not text: {raw_q!r}") + at)
        at = f" in {CONVERSATION_FIELD}[{2 * k + 1}]" if multi else ""
        answer = _text(raw_a)
        if not answer:
            bad("empty answer", ("no answer text" if raw_a is None or answer == "" else f"not text: {raw_a!r}") + at)
        pairs.append((question or "", answer or ""))
    used = pairs if turns == "all" else pairs[:1]

    answer_types: list[str | None] = []
    if has_answer_types:
        raw_type = data.get(ANSWER_TYPE_FIELD)
        answer_type = ANSWER_TYPE_MAP.get(str(raw_type).strip().lower()) if raw_type is not None else None
        if raw_type is None:
            # Inferring for some rows only would mix two labelling schemes in one dataset.
            bad("missing answer type", f"the file has `{ANSWER_TYPE_FIELD}`, but not this row")
        elif answer_type is None:
            bad("unknown answer type", f"{raw_type!r} (expected one of {sorted(ANSWER_TYPE_MAP)})")
        elif len(used) > 1:
            bad("ambiguous answer type", f"one `{ANSWER_TYPE_FIELD}` ({raw_type!r}) for a conversation of "
                f"{len(used)} questions, each made an entry (turns: all); remove the field to have each "
                "answer's type inferred, or use turns: first")
        answer_types = [answer_type] * len(used)
    else:
        answer_types = [infer_answer_type(answer) if answer else None for _, answer in used]

    modality = _optional(data, MODALITY_FIELDS, bad)
    question_type = _optional(data, QUESTION_TYPE_FIELDS, bad)

    image = _image_png(_first(data, IMAGE_FIELDS), root, cache)
    if isinstance(image, _Issue):
        issues.append(_Issue(image.kind, label, image.detail))
    lesion = None
    if not isinstance(image, _Issue) and (data.get("lesion_mask") is not None or data.get("lesion_boxes") is not None):
        lesion = _lesion_png(data, image, root, cache)
        if isinstance(lesion, _Issue):
            issues.append(_Issue(lesion.kind, label, lesion.detail))

    if issues:
        return [], issues, 0
    entries = []
    for k, ((question, answer), answer_type) in enumerate(zip(used, answer_types, strict=True)):
        row = {
            "id": row_id if k == 0 else f"{row_id}-t{k}",
            "dataset": dataset,
            "split": split,
            "image": image,
            "question": question,
            "answer": answer,
            "answer_type": answer_type,
            "modality": modality,
            "question_type": question_type,
            "context": [{"question": q, "answer": a} for q, a in pairs[:k]],
        }
        if lesion is not None:
            row["lesion_mask"], row["lesion_source"] = lesion
        entries.append(row)
    return entries, [], len(pairs) - len(used)


def _lesion_png(data: dict[str, Any], image: bytes, root: Path, cache: dict[str, bytes | str]
                ) -> tuple[bytes, str] | _Issue:
    """A row's lesion annotation as a mask PNG (mode L, the image's size, 255 = lesion) and its
    source: `lesion_mask`, an image path or bytes like `image` (nonzero = lesion; SLAKE's masks),
    or `lesion_boxes`, a list of [x0, y0, x1, y1] boxes in the image's pixels."""
    import io

    from PIL import Image, ImageDraw

    size = Image.open(io.BytesIO(image)).size
    if data.get("lesion_mask") is not None:
        mask = _image_png(data["lesion_mask"], root, cache)
        if isinstance(mask, _Issue):
            return _Issue("bad lesion annotation", "", f"lesion_mask: {mask.detail}")
        pil = Image.open(io.BytesIO(mask)).convert("L")
        if pil.size != size:
            return _Issue("bad lesion annotation", "", f"lesion_mask is {pil.size[0]}x{pil.size[1]}, the image "
                          f"{size[0]}x{size[1]}")
        pil = pil.point(lambda v: 255 if v else 0)
        source = "mask"
    else:
        boxes = data["lesion_boxes"]
        ok = isinstance(boxes, list) and all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
            and b[0] < b[2] and b[1] < b[3] for b in boxes)
        if not ok:
            return _Issue("bad lesion annotation", "", f"lesion_boxes must be a list of [x0, y0, x1, y1] "
                          f"with x0 < x1 and y0 < y1, got {boxes!r}")
        pil = Image.new("L", size, 0)
        draw = ImageDraw.Draw(pil)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
        source = "boxes"
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue(), source


def infer_answer_type(answer: str) -> str:
    """Return "closed" iff the answer is yes or no (case, spaces and a final period ignored), else "open"."""
    return "closed" if answer.strip().lower().rstrip(".!").strip() in YES_NO else "open"


def _optional(data: dict[str, Any], names: tuple[str, ...], bad: Callable[[str, str], None]) -> str:
    value = _first(data, names)
    if value is None:
        return UNKNOWN
    text = _text(value)
    if text is None:
        bad("invalid row", f"{'/'.join(names)} is not text: {value!r}")
        return UNKNOWN
    return text or UNKNOWN


def _image_png(value: Any, root: Path, cache: dict[str, bytes | str]) -> bytes | _Issue:
    """PNG bytes for a row's image reference, or an _Issue (label filled in by the caller).

    Datasets ask many questions about one image (VQA-RAD: ~11 per image), so each distinct image
    is decoded once; failures are cached too so every row that uses a broken image is reported.
    """
    name = "embedded image"
    if isinstance(value, dict):
        # Hub "Image" struct: embedded bytes, or a path when the bytes were not embedded.
        if value.get("bytes") is not None and isinstance(value.get("path"), str) and value["path"]:
            name = f"embedded image {value['path']}"  # a ".dcm" name also marks the bytes as DICOM
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        return _Issue("missing image", "", f"none of {list(IMAGE_FIELDS)} is set")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            return _Issue("unreadable image", "", "embedded image is empty (0 bytes)")
        key = "sha256:" + hashlib.sha256(data).hexdigest()
        source: bytes | Path = data
    elif isinstance(value, str) and value.strip():
        path = root / value.strip()
        key = "path:" + str(path)
        name = str(path)
        if key not in cache and not path.is_file():
            return _Issue("missing image", "", f"{path} not found")
        source = path
    else:
        return _Issue("missing image", "", f"image reference is not a path or bytes: {value!r}")

    if key not in cache:
        try:
            cache[key] = encode_png(load_image(source, name=name))
        except ImageError as e:
            cache[key] = str(e)
    result = cache[key]
    return result if isinstance(result, bytes) else _Issue("unreadable image", "", result)


def _summarize(issues: list[_Issue]) -> str:
    by_kind: dict[str, list[_Issue]] = {}
    for issue in issues:
        by_kind.setdefault(issue.kind, []).append(issue)
    lines = []
    for kind, group in by_kind.items():
        shown = "; ".join(f"{i.label}: {i.detail}" if i.label else i.detail for i in group[:MAX_LISTED])
        more = f"; and {len(group) - MAX_LISTED} more" if len(group) > MAX_LISTED else ""
        lines.append(f"  {kind}: {len(group)} rows, e.g. {shown}{more}")
    return "\n".join(lines)
