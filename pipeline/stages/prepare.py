"""`prepare` stage: the embedded phantom benchmark, or the user's own VQA files, as canonical Parquet."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import VQA_SCHEMA, write_rows

app = typer.Typer(add_completion=False)


def _summary(rows: list[dict]) -> dict:
    return {
        "rows": len(rows),
        "answer_type": dict(Counter(r["answer_type"] for r in rows)),
        "modality": dict(Counter(r["modality"] for r in rows)),
        "question_type": dict(Counter(r["question_type"] for r in rows)),
    }


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out_dir: Path = typer.Option(Path("data/prepared"), help="where train.parquet and test.parquet go"),
    metrics: Path = typer.Option(Path("reports/prepare.json"), help="stage summary"),
) -> None:
    cfg = section(load_params(params), "prepare")
    source = cfg.get("source", "phantom")
    report: dict = {"source": source}
    if source == "phantom":
        from pipeline.data.phantoms import generate_dataset

        ph = cfg["phantom"]
        train, test = generate_dataset(
            n_train=int(ph["n_train"]), n_test=int(ph["n_test"]), seed=int(cfg.get("seed", 0)),
            prior=float(ph["prior"]), image_size=int(ph.get("image_size", 64)),
        )
    elif source == "files":
        from pipeline.data.ingest import ingest

        files = cfg["files"]
        splits = {}
        for split in ("train", "test"):
            spec = files[split]
            result = ingest(
                Path(spec["path"]), fmt=spec.get("format"),
                image_root=Path(spec["image_root"]) if spec.get("image_root") else None,
                split=split, dataset=files.get("dataset", "custom"), skip_bad=bool(files.get("skip_bad", False)),
            )
            if result.skipped:
                typer.echo(f"prepare: skipped {len(result.skipped)} bad {split} rows (skip_bad: true)", err=True)
                for reason in result.skipped[:10]:
                    typer.echo(f"  {reason}", err=True)
            report[f"{split}_skipped"] = len(result.skipped)
            splits[split] = result.rows
        train, test = splits["train"], splits["test"]
    else:
        raise typer.BadParameter(f"prepare.source must be 'phantom' or 'files', got {source!r}")
    write_rows(train, out_dir / "train.parquet", VQA_SCHEMA)
    write_rows(test, out_dir / "test.parquet", VQA_SCHEMA)
    report["train"] = _summary(train)
    report["test"] = _summary(test)
    write_json(metrics, report)
    typer.echo(f"prepare: {len(train)} train rows, {len(test)} test rows -> {out_dir}")


if __name__ == "__main__":
    app()
