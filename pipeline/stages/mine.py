"""`mine` stage: choose the pool of training entries preferences are built from -> data/pool.parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.mining import MineConfig, mine
from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import POOL_SCHEMA, VQA_SCHEMA, read_rows, write_rows

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (reads `mine:`)"),
    input: Path = typer.Option(Path("data/prepared/train.parquet"), help="prepared training split"),
    output: Path = typer.Option(Path("data/pool.parquet"), help="pool of mined entries"),
    metrics: Path = typer.Option(Path("reports/mine.json"), help="stage summary"),
) -> None:
    config = MineConfig.from_section(section(load_params(params), "mine"))
    rows = read_rows(input, VQA_SCHEMA)
    pool, report = mine(rows, config)
    if report["capped"]:
        typer.echo(
            f"warning: mine.size={config.size} but {input} holds {len(rows)} entries; the pool takes "
            f"{len(pool)} (reported as `capped` in {metrics})",
            err=True,
        )
    write_rows(pool, output, POOL_SCHEMA)
    write_json(metrics, report)
    typer.echo(f"mine {config.strategy}: {len(pool)} of {len(rows)} entries -> {output}")


if __name__ == "__main__":
    app()
