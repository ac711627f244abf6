"""`sample` stage: k graded dispreferred candidates per pool entry (HSCR §3.1).

Finished batches are written to `data/work/sample/` as they complete, under a fingerprint of
everything that determines them; a run that is interrupted and started again (`dvc repro`)
skips the batches already done. The final artifact is still one Parquet file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer
from tqdm.auto import tqdm

from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import CANDIDATES_SCHEMA, POOL_SCHEMA, read_rows, write_table

app = typer.Typer(add_completion=False)


def _fingerprint(cfg: dict, model_dir: Path, pool: Path, batch_size: int) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(str(batch_size).encode())
    for path in sorted([*model_dir.glob("*.safetensors"), model_dir / "config.json", pool]):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def summarize(rows: list[dict]) -> dict:
    n_cand = [len(r["candidates"]) for r in rows]
    replaced = [len(c["positions"]) for r in rows for c in r["candidates"]]
    cand_lp = [c["logprob"] for r in rows for c in r["candidates"]]
    by_level: dict[int, list[float]] = {}
    for r in rows:
        for c in r["candidates"]:
            by_level.setdefault(c["level"], []).append(c["logprob"])

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "entries": len(rows),
        "candidates": sum(n_cand),
        "candidates_per_entry": mean(n_cand),
        "entries_without_candidates": sum(1 for n in n_cand if n == 0),
        "mean_replaced_positions": mean(replaced),
        "mean_logprob_chosen": mean([r["chosen_logprob"] for r in rows]),
        "mean_logprob_candidates": mean(cand_lp),
        "mean_logprob_by_level": {str(k): mean(v) for k, v in sorted(by_level.items())},
        "distinct_candidate_share": mean(
            [len({c["text"] for c in r["candidates"]}) / len(r["candidates"]) for r in rows if r["candidates"]]
        ),
    }


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    pool: Path = typer.Option(Path("data/pool.parquet")),
    model: Path = typer.Option(Path("models/sft")),
    output: Path = typer.Option(Path("data/candidates.parquet")),
    metrics: Path = typer.Option(Path("reports/sample.json")),
    work_dir: Path = typer.Option(Path("data/work/sample")),
) -> None:
    from pipeline.models.profiles import load_vlm
    from pipeline.self_contrast import SampleConfig, sample_batch

    all_params = load_params(params)
    cfg = dict(section(all_params, "sample"))
    batch_size = int(cfg.pop("batch_size", 8))
    cfg["mask_ratio"] = float(all_params["mask_ratio"])
    sample_cfg = SampleConfig(**cfg)
    if sample_cfg.mode not in ("replace", "decode"):
        raise typer.BadParameter(f"sample.mode must be replace or decode, got {sample_cfg.mode!r}")
    rows = read_rows(pool, POOL_SCHEMA)
    torch.manual_seed(sample_cfg.seed)
    vlm = load_vlm(model)

    fingerprint = _fingerprint(asdict(sample_cfg), model, pool, batch_size)
    parts = work_dir / fingerprint
    if work_dir.exists():  # parts of runs with other settings can never be reused
        for stale in work_dir.iterdir():
            if stale.name != fingerprint:
                shutil.rmtree(stale, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    n_batches = (len(rows) + batch_size - 1) // batch_size
    done = sum(1 for i in range(n_batches) if (parts / f"part-{i:05d}.parquet").exists())
    if done:
        typer.echo(f"sample: resuming, {done}/{n_batches} batches already done")
    for i in tqdm(range(n_batches), desc="sample", unit="batch", initial=0):
        part = parts / f"part-{i:05d}.parquet"
        if part.exists():
            continue
        out = sample_batch(vlm, rows[i * batch_size:(i + 1) * batch_size], sample_cfg)
        write_table(pa.Table.from_pylist(out, schema=CANDIDATES_SCHEMA), part, CANDIDATES_SCHEMA)
    table = pa.concat_tables(pq.read_table(parts / f"part-{i:05d}.parquet") for i in range(n_batches))
    write_table(table, output, CANDIDATES_SCHEMA)
    summary = summarize(table.to_pylist())
    summary.update({"mode": sample_cfg.mode, "mask_ratio": sample_cfg.mask_ratio, "k": sample_cfg.k})
    write_json(metrics, summary)
    shutil.rmtree(parts, ignore_errors=True)
    typer.echo(f"sample: {summary['candidates']} candidates for {summary['entries']} entries -> {output}")


if __name__ == "__main__":
    app()
