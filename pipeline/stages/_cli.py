"""What every stage script shares: the same option names and one way to fail.

Every stage takes `--params`, its inputs (`--input`, `--model`, ...), `--output`/`--outputs` and
`--metrics`, all required, so the paths come from dvc.yaml alone. An expected failure
(`pipeline.errors.PipelineError`: bad params, bad data, a missing file, an unreachable judge)
prints one short message and exits with the error's code, without a traceback; anything else is
a bug and keeps Typer's traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline.errors import PipelineError


def stage_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, help=help_text, pretty_exceptions_show_locals=False)


def params_option(section: str) -> Path:
    return typer.Option(..., "--params", help=f"params file; this stage reads its `{section}:` section", dir_okay=False)


def input_option(what: str, flag: str = "--input") -> Path:
    return typer.Option(..., flag, help=what, exists=True)


def output_option(what: str, flag: str = "--output") -> Path:
    return typer.Option(..., flag, help=what)


def metrics_option() -> Path:
    return typer.Option(..., "--metrics", help="stage metrics (JSON, read by `dvc metrics`)", dir_okay=False)


def timings_option() -> Path:
    # Wall-clock seconds and throughput differ on every run and machine: kept out of the cached
    # metrics so that a fresh clone's `dvc repro` reproduces every cached output byte for byte.
    return typer.Option(..., "--timings", help="wall-clock timings of this run (JSON; an uncached DVC output)",
                        dir_okay=False)


def run(app: typer.Typer) -> None:
    """Run a stage's Typer app; expected failures become one line on stderr and an exit code."""
    try:
        app()
    except PipelineError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(error.exit_code)
