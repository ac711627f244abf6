"""Where the default `dvc repro` spends its time: every stage's wall seconds and its top costs.

Runs each stage's command from dvc.yaml (in dvc.yaml's order, which is the pipeline's order;
`foreach` stages once per item) under Python's cProfile, in a repository you name, with that
stage's scratch state (its `--work-dir` and `--cache`, all under data/work/) removed first, as in
a fresh clone: a resumable stage would otherwise reuse its finished batches and measure nothing.

    git clone . /tmp/profile-clone && cd /tmp/profile-clone && dvc repro   # or dvc pull
    python benchmarks/profile_repro.py --repo /tmp/profile-clone

Each stage writes the same outputs it writes under `dvc repro` (same params, same bytes), so the
clone's `dvc status` stays clean; run it in a clone all the same, since a stage interrupted here
leaves its outputs half-written. cProfile adds a little per Python call (a few percent on these
torch-bound stages: compare `wall_seconds` with `reports/timings/*.json` of a plain run).

For each stage the report gives its wall seconds and share of the total, and its top functions
by self time: torch's operators appear as the builtins that run them (`torch._C._nn.linear`, the
autograd engine's `run_backward`, `scaled_dot_product_attention`), so the names say what the
machine is busy with. Writes reports/benchmarks/profile_repro.json and the raw `.prof` files
(readable with `python -m pstats` or snakeviz) under `--prof-dir`.
"""

from __future__ import annotations

import json
import pstats
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import ROOT, device_name, save_run  # noqa: E402

from pipeline.reporting import read_json  # noqa: E402

app = typer.Typer(add_completion=False)
SCRATCH_OPTIONS = ("--work-dir", "--cache")


def stage_commands(repo: Path) -> list[tuple[str, list[str]]]:
    """(stage name, argv) for every stage of the repository's dvc.yaml, in file order."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                out.append((f"{name}@{item}", shlex.split(stage["do"]["cmd"].replace("${item}", str(item)))))
        else:
            out.append((name, shlex.split(stage["cmd"])))
    return out


def scratch_paths(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in SCRATCH_OPTIONS]


def profiled(argv: list[str], prof: Path) -> list[str]:
    """The stage's command with its module run under cProfile, writing `prof`.

    `python -m MODULE ARGS` -> `python -m cProfile -o PROF -m MODULE ARGS`;
    `accelerate launch [OPTIONS] -m MODULE ARGS` (the `train` stage) keeps accelerate's launch
    and profiles the process it starts: `... -m cProfile -o PROF -m MODULE ARGS`.
    """
    if argv[:2] == ["python", "-m"]:
        return [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", *argv[2:]]
    if argv[:2] == ["accelerate", "launch"] and "-m" in argv:
        at = argv.index("-m")
        launcher = [str(Path(sys.executable).with_name("accelerate")), *argv[1:at]]
        return [*launcher, "-m", "cProfile", "-o", str(prof), "-m", *argv[at + 1:]]
    raise ValueError(f"expected a `python -m` or `accelerate launch ... -m` stage command, got {shlex.join(argv)!r}")


def top_functions(prof: Path, top: int) -> list[dict]:
    """The `top` functions by self time (tottime), with their share of the stage's profiled time."""
    stats = pstats.Stats(str(prof))
    total = stats.total_tt or 1.0
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        where = func if file == "~" else f"{Path(file).name}:{line}({func})"
        rows.append({"function": where, "self_seconds": round(tottime, 2), "self_share": round(tottime / total, 3),
                     "cumulative_seconds": round(cumtime, 2), "calls": calls})
    rows.sort(key=lambda r: r["self_seconds"], reverse=True)
    return rows[:top]


@app.command()
def main(
    repo: Path = typer.Option(..., help="a clone whose outputs are in place (after `dvc repro` or `dvc pull`)"),
    stages: str = typer.Option("", help="comma-separated stage names (e.g. sft,evaluate@sft); empty: all"),
    top: int = typer.Option(8, min=1, help="functions listed per stage"),
    prof_dir: Path = typer.Option(ROOT / "reports" / "profile", help="where the .prof files go"),
    out: Path = typer.Option(ROOT / "reports" / "benchmarks" / "profile_repro.json"),
) -> None:
    repo = repo.resolve()
    if repo == ROOT and not typer.confirm("this rewrites the outputs of this work tree; go on?"):
        raise typer.Abort()
    commands = stage_commands(repo)
    wanted = [s for s in stages.split(",") if s]
    unknown = sorted(set(wanted) - {name for name, _ in commands})
    if unknown:
        raise typer.BadParameter(f"unknown stages {unknown}; dvc.yaml has {[n for n, _ in commands]}")
    prof_dir.mkdir(parents=True, exist_ok=True)
    import torch

    # One report per machine, stage by stage: each stage's numbers are saved as soon as it ends
    # (a failure or Ctrl-C keeps the others), and a run of some stages replaces only theirs.
    key = device_name(torch.device("cpu"))
    previous = read_json(out).get("runs", {}).get(key, {}) if out.exists() else {}
    results: dict[str, dict] = dict(previous.get("stages", {}))
    order = [name for name, _ in commands]
    for name, argv in commands:
        if wanted and name not in wanted:
            continue
        for path in scratch_paths(argv):
            target = repo / path
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        prof = prof_dir / f"{name.replace('@', '_')}.prof"
        typer.echo(f"{name}: {shlex.join(argv)}", err=True)
        start = time.perf_counter()
        done = subprocess.run(profiled(argv, prof), cwd=repo, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"stage {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results[name] = {"wall_seconds": round(seconds, 1), "top_self_time": top_functions(prof, top),
                         "repo_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                                       text=True).stdout.strip()}
        typer.echo(f"  {seconds:.1f} s", err=True)
        results = {n: results[n] for n in order if n in results}
        total = sum(r["wall_seconds"] for r in results.values())
        for r in results.values():
            r["share_of_total"] = round(r["wall_seconds"] / total, 3) if total else None
        report = {"device": key, "torch_threads_default": torch.get_num_threads(),
                  "stages_measured": f"{len(results)} of {len(order)}",
                  "total_wall_seconds": round(total, 1), "stages": results}
        save_run("profile_repro", key, report, out)
    print(json.dumps({n: r["wall_seconds"] for n, r in results.items()}, indent=2))
    typer.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    app()
