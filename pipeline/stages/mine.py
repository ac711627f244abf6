"""`mine` stage: choose the pool of training entries preferences are built from."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages._cli import input_option, metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("mine"),
    input: Path = input_option("prepared training split (Parquet)"),
    output: Path = output_option("pool of mined entries (Parquet)"),
    metrics: Path = metrics_option(),
) -> None:
    from pipeline.mining import MineConfig, mine
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.schema import POOL_SCHEMA, VQA_SCHEMA, read_rows, write_rows

    config = load_config(MineConfig, params, "mine")
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
    run(app)
