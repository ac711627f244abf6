"""Run a named sweep of sweeps.yaml (configurations × seeds) as queued DVC experiments, and
compare its runs (docs/sweeps.md).

`queue NAME` queues one `dvc exp run --queue -n <sweep>-<config>-s<seed> -S ...` per (config,
seed), skipping experiments that already exist or are already queued; `run NAME` also starts
one queue worker (`dvc queue start --jobs 1`) and waits until every one has finished, failing
with the list of failed experiments; `report NAME --baseline CONFIG/MODEL` compares the runs
(read as `rev:<experiment name>`) and writes reports/sweeps/<NAME>.md and .json; `list` shows the
sweeps and their experiments. Not a DVC stage: it drives DVC.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages._cli import run, stage_app
from pipeline.sweeps import (
    REPORTS_DIR,
    START_COMMAND,
    SWEEPS_FILE,
    Experiment,
    SweepsFile,
    check_values,
    existing_copy_paths,
    experiments,
    load_sweeps,
    parse_seeds,
    queue,
    queue_command,
    render_report,
    report,
    run_sweep,
    subprocess_runner,
    write_report,
)

app = stage_app(__doc__)

FILE_HELP = "the sweeps file (seed keys and named sweeps)"
PARAMS_HELP = "the params file every override key must exist in (the experiments' starting point)"
SEEDS_HELP = "comma-separated seeds to run instead of the sweep's own list, e.g. 0,1,2"


def _load(file: Path, params: Path) -> SweepsFile:
    return load_sweeps(file, params)


def _copy_paths(sweeps: SweepsFile) -> list[str]:
    present, missing = existing_copy_paths(sweeps)
    for path in missing:
        typer.echo(f"note: copy path {path} does not exist here; not passed to `dvc exp run -C` "
                   "(the queued experiments will not have it, docs/sweeps.md)", err=True)
    return present


def _prepare(name: str, seeds: str | None, file: Path, params: Path) -> tuple[SweepsFile, list[Experiment], list[str]]:
    sweeps = _load(file, params)
    chosen = experiments(sweeps, name, parse_seeds(seeds) if seeds is not None else None)
    check_values(sweeps, chosen, params)
    return sweeps, chosen, _copy_paths(sweeps)


@app.command("list", help="The sweeps of the file and the experiment names each one queues.")
def list_(
    name: str | None = typer.Argument(None, help="one sweep (default: all)"),
    file: Path = typer.Option(Path(SWEEPS_FILE), "--file", help=FILE_HELP, dir_okay=False),
    params: Path = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP, dir_okay=False),
) -> None:
    sweeps = _load(file, params)
    for sweep_name in [name] if name else list(sweeps.sweeps):
        sweep = sweeps.sweep(sweep_name)
        typer.echo(f"{sweep_name}: {sweep.help} ({len(sweep.configs)} configs × seeds {sweep.seeds}"
                   f"{', SFT retrained per seed' if sweep.retrain_sft else ''})")
        for experiment in experiments(sweeps, sweep_name):
            typer.echo(f"  {experiment.name}")


@app.command("queue", help="Queue the sweep's experiments (`dvc exp run --queue`, one per config and seed); "
             "experiments that exist or are queued already are skipped. Start them with `dvc queue start`.")
def queue_(
    name: str = typer.Argument(..., help="the sweep (a key of `sweeps:` in the file)"),
    seeds: str | None = typer.Option(None, "--seeds", help=SEEDS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="only print the commands; run nothing"),
    file: Path = typer.Option(Path(SWEEPS_FILE), "--file", help=FILE_HELP, dir_okay=False),
    params: Path = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP, dir_okay=False),
) -> None:
    _, chosen, copy = _prepare(name, seeds, file, params)
    if dry_run:
        for experiment in chosen:
            typer.echo(" ".join(queue_command(experiment, copy)))
        return
    done = queue(chosen, subprocess_runner(), typer.echo, copy)
    typer.echo(f"queued {len(done.queued)} experiment(s) of sweep {name!r}; start them with "
               f"`{' '.join(START_COMMAND)}` (or use `sweep run`)")


@app.command("run", help="Queue the sweep's experiments, start one queue worker (`dvc queue start --jobs 1`) "
             "and wait until all have finished; fails listing the failed ones (running it again reruns only "
             "those).")
def run_(
    name: str = typer.Argument(..., help="the sweep (a key of `sweeps:` in the file)"),
    seeds: str | None = typer.Option(None, "--seeds", help=SEEDS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="only print the commands; run nothing"),
    poll: float = typer.Option(30.0, "--poll", min=0.1, help="seconds between two `dvc queue status` checks"),
    file: Path = typer.Option(Path(SWEEPS_FILE), "--file", help=FILE_HELP, dir_okay=False),
    params: Path = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP, dir_okay=False),
) -> None:
    _, chosen, copy = _prepare(name, seeds, file, params)
    if dry_run:
        for experiment in chosen:
            typer.echo(" ".join(queue_command(experiment, copy)))
        typer.echo(" ".join(START_COMMAND))
        return
    states = run_sweep(chosen, subprocess_runner(), typer.echo, copy_paths=copy, poll_s=poll)
    typer.echo(f"sweep {name!r}: {len(states)} experiment(s) finished; compare them with "
               f"`python -m pipeline.stages.sweep report {name} --baseline CONFIG/MODEL`")


@app.command("report", help="Compare the sweep's runs (each read as rev:<experiment name>) against a "
             "baseline: writes <output-dir>/<NAME>.md and .json and prints the Markdown.")
def report_(
    name: str = typer.Argument(..., help="the sweep (a key of `sweeps:` in the file)"),
    baseline: str = typer.Option(..., "--baseline", help="CONFIG/MODEL every row is compared with, CONFIG a "
                                 "config of the sweep, e.g. default/sft or both/aligned"),
    seeds: str | None = typer.Option(None, "--seeds", help=SEEDS_HELP),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="leave out (and list) experiments that "
                                      "cannot be read instead of failing"),
    resamples: int = typer.Option(9999, "--resamples", min=1, help="bootstrap resamples and random permutations"),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="seed of every bootstrap and permutation "
                                       "(the same runs and seed give the same report)"),
    output_dir: Path = typer.Option(Path(REPORTS_DIR), "--output-dir", help="folder of <NAME>.md and <NAME>.json",
                                    file_okay=False),
    file: Path = typer.Option(Path(SWEEPS_FILE), "--file", help=FILE_HELP, dir_okay=False),
    params: Path = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP, dir_okay=False),
) -> None:
    sweeps = _load(file, params)
    result = report(sweeps, name, baseline, seeds=parse_seeds(seeds) if seeds is not None else None,
                    resamples=resamples, bootstrap_seed=bootstrap_seed, skip_missing=skip_missing)
    json_path, md_path = write_report(result, output_dir)
    typer.echo(render_report(result), nl=False)
    typer.echo(f"\nwritten: {md_path}, {json_path}")


if __name__ == "__main__":
    run(app)
