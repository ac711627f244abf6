"""HSCR Fig. 4 on held-out data: log p(ground truth) − log p(hallucinated candidate) per modality.

The training-pool gaps (`pipeline.evaluation.logprob_gap_report` on `data/scored.parquet`) measure
the aligned model on the very pairs it was trained to separate, so a larger gap there is partly
memorisation. Here the entries are test rows (`data/prepared/test.parquet`), a seeded sample
stratified by modality (`evaluate.heldout_gap`), and their hallucinated candidates are made at evaluation
time by the sampler of the `sample` stage (`pipeline.self_contrast.sample_pool`: the SFT model,
the `sample:` settings and the top-level `mask_ratio`), so no model ever trained on them.

Each entry keeps one candidate: the one of the highest level (the most sensitive positions
replaced; with a one-token answer every level replaces the same position and the first, the best
ranked replacement, is kept). A candidate whose normalised text equals the ground truth's is no
hallucination and is dropped; entries left without a candidate are counted in the summary, not
hidden. The gaps are then scored for every model by `logprob_gap_report`, resumable like the
training-pool ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.evaluation import GapConfig, GapReport, logprob_gap_report
from pipeline.fingerprint import fingerprint
from pipeline.models.vlm import VLM
from pipeline.self_contrast import SampleConfig, sample_pool

HELDOUT_DATA = "test (held out)"
TRAIN_DATA = "train (preference pool)"


def stratified_sample(rows: Sequence[Mapping[str, Any]], entries: int, seed: int) -> list[dict]:
    """`entries` rows (all of them if there are fewer), spread as evenly over the modalities as their
    row counts allow, drawn at random with `seed`; in the order of `rows`.

    Even rather than proportional: Fig. 4 is a histogram per modality, and a rare modality would
    otherwise get too few entries to draw one. The draw depends on the rows' ids, not their order.
    """
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["modality"], []).append(r["id"])
    if sum(len(ids) for ids in groups.values()) != len({r["id"] for r in rows}):
        raise DataError("the test rows repeat an id: the held-out sample needs unique ids")
    rng = random.Random(seed)
    order = {m: rng.sample(sorted(ids), len(ids)) for m, ids in sorted(groups.items())}
    quota = dict.fromkeys(order, 0)
    left = min(entries, len(rows))
    while left:  # one per modality with rows to spare, round after round
        for m in order:
            if left and quota[m] < len(order[m]):
                quota[m] += 1
                left -= 1
    chosen = {i for m, ids in order.items() for i in ids[: quota[m]]}
    return [dict(r) for r in rows if r["id"] in chosen]


def heldout_entries(sampled: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
                    ) -> tuple[list[dict], dict[str, int]]:
    """Preference-form entries (`rejected`: the highest-level candidate) from the sampler's
    CANDIDATES_SCHEMA rows of `rows`, and the counts of what was left out."""
    from pipeline.metrics import normalize_answer

    entries: list[dict] = []
    counts = {"entries": len(rows), "without_candidate": 0, "candidates_equal_to_truth": 0}
    for row, out in zip(rows, sampled, strict=True):
        if out["id"] != row["id"]:
            raise RuntimeError(f"the sampler returned {out['id']!r} where {row['id']!r} was expected")
        truth = normalize_answer(row["answer"])
        candidates = [c for c in out["candidates"] if normalize_answer(c["text"]) != truth]
        counts["candidates_equal_to_truth"] += len(out["candidates"]) - len(candidates)
        if not candidates:
            counts["without_candidate"] += 1
            continue
        top = max(candidates, key=lambda c: c["level"])  # the first of the highest level on ties
        entries.append({**row, "rejected": [{"text": top["text"], "level": top["level"]}]})
    return entries, counts


def heldout_gap_report(
    load: Callable[[str], VLM],
    models: Sequence[tuple[str, str]],
    sampler: str,
    test_rows: Sequence[Mapping[str, Any]],
    training_ids: Collection[str],
    sample_cfg: SampleConfig,
    gap_cfg: GapConfig,
    batch_size: int,
    work_dir: str | Path,
    inputs: Mapping[str, Any],
) -> GapReport:
    """HSCR Fig. 4 on held-out test entries for every (name, folder) model: `<name>_logprob_gap`
    summaries (with `data`, `entries` and the counts of `heldout_entries`) and the per-modality
    histograms. `sampler` names the model of `models` whose candidates are sampled (the SFT model,
    as in the `sample` stage). `inputs` holds content digests `{"test": <test split>, "models":
    {name: <model folder>}}`; with the sample they key the sampler's batches (under
    `work_dir/sample`) and the gaps' (under `work_dir/gaps`), both resumable.

    A sampled id that is also in `training_ids` (the preference pool) is an error: the point of the
    analysis is that no model trained on its entries.
    """
    folders = dict(models)
    if sampler not in folders:
        raise DataError(f"the candidate sampler {sampler!r} is not one of the models {sorted(folders)}")
    rows = stratified_sample(test_rows, gap_cfg.entries, gap_cfg.seed)
    leaked = sorted({r["id"] for r in rows} & set(training_ids))
    if leaked:
        raise DataError(f"{len(leaked)} held-out test entries are in the training preference pool, e.g. "
                        f"{leaked[:3]}: the test split leaks into train")
    ids = [r["id"] for r in rows]
    sampled = sample_pool(load(folders[sampler]), rows, sample_cfg, Path(work_dir) / "sample",
                          {"pool": fingerprint("heldout", inputs["test"], ids), "model": inputs["models"][sampler]})
    entries, counts = heldout_entries(sampled.table.to_pylist(), rows)
    digest = fingerprint("heldout", [(r["id"], r["rejected"][0]["text"]) for r in entries])
    result = logprob_gap_report(load, models, entries, batch_size, Path(work_dir) / "gaps",
                                {"preferences": digest, "models": inputs["models"]})
    for name, _ in models:
        key = f"{name}_logprob_gap"
        result.report[key] = {"data": HELDOUT_DATA, "candidate": "highest level", **counts,
                              **result.report.get(key, {})}
    result.work["sample"] = {"batches": sampled.batches, "reused": sampled.reused, "computed": sampled.computed}
    return result
