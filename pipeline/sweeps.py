"""Named sweeps: configurations × seeds, each run as one queued DVC experiment.

`sweeps.yaml` (repository root) names which params.yaml keys are seeds and defines named sweeps:
each a set of named configurations (param overrides, keys exactly as `dvc exp run -S` takes them)
crossed with a list of seeds. One (config, seed) pair is one experiment, named
`<sweep>-<config>-s<seed>` and queued with

    dvc exp run --queue -n <name> -S <key>=<value> ... -S sample.seed=<seed> -S train.seed=<seed> [-C <path>]

(`queue_command`), so DVC's own machinery runs it (`dvc queue start`) in a temporary workspace and
records it as an experiment that `pipeline.compare` reads back as `rev:<name>` (`report`).

`load_sweeps` checks the file strictly before anything runs: unknown keys, names that are not
usable as experiment names, duplicate or negative seeds, override and seed keys that params.yaml
does not have (with the nearest one), a config that sets a seed key itself. `check_values` then
applies each experiment's overrides to a copy of params.yaml with DVC's own writer
(`dvc.utils.hydra.apply_overrides`, what `-S` calls) and validates every section, so a bad value
(`sample.mask_strategy: pixle`) fails in seconds rather than hours into a queue.

Everything that talks to DVC goes through a `Runner` (a function that runs one argument list and
returns its exit status and output), so the command lists, the queue bookkeeping and the report
wiring are testable without DVC.
"""

from __future__ import annotations

import difflib
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.compare import Run, compare_runs, load_source, parse_baseline, render_markdown
from pipeline.errors import InputNotFoundError, ParamsError, PipelineError
from pipeline.params import PARAMS_FILE, _Loader, load_params

SWEEPS_FILE = "sweeps.yaml"
REPORTS_DIR = "reports/sweeps"
# Sweep and config names become experiment names (git refs): lower-case words joined by `-`,
# a `.` allowed inside (ratio-0.3).
NAME_PATTERN = re.compile(r"[a-z0-9]+(?:[-.][a-z0-9]+)*")
DONE = ("Success", "Failed")
ACTIVE = ("Queued", "Running")

Scalar = bool | int | float | str | None


class SweepError(PipelineError, RuntimeError):
    """A sweep could not be queued, or some of its experiments failed."""


# ---------------------------------------------------------------------------------------------
# The file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SeedParams(_Strict):
    """Which params.yaml keys receive a sweep's seed."""

    params: list[str] = Field(min_length=1, description="keys every sweep sets to its seed")
    sft_params: list[str] = Field(description="keys set to the seed too by sweeps with retrain_sft: true")


class Sweep(_Strict):
    """One named sweep: configurations × seeds."""

    help: str = Field(min_length=1, description="what the sweep measures (one line)")
    retrain_sft: bool = Field(description="also write the seed to seeds.sft_params (SFT retrained per seed)")
    seeds: list[int] = Field(min_length=1, description="the seeds, each >= 0, no duplicates")
    configs: dict[str, dict[str, Scalar]] = Field(min_length=1, description="config name -> {params key: value}")


class SweepsFile(_Strict):
    """The whole sweeps.yaml."""

    seeds: SeedParams
    copy_paths: list[str] = Field(description="git-ignored paths copied into each queued run (dvc exp run -C)")
    sweeps: dict[str, Sweep] = Field(min_length=1)

    def sweep(self, name: str) -> Sweep:
        if name not in self.sweeps:
            close = difflib.get_close_matches(name, list(self.sweeps), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParamsError(f"no sweep named {name!r}{hint} (sweeps: {', '.join(self.sweeps)})")
        return self.sweeps[name]

    def seed_keys(self, sweep: Sweep) -> list[str]:
        return [*self.seeds.params, *(self.seeds.sft_params if sweep.retrain_sft else [])]


def project_sweeps_path() -> Path:
    """The repository's own sweeps.yaml."""
    return Path(__file__).resolve().parents[1] / SWEEPS_FILE


def param_keys(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every key of a params mapping in `-S` form (`section.key`, nested with dots) → its value;
    mappings are listed too (so a key naming a whole section can be told apart from a typo)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        out[dotted] = value
        if isinstance(value, Mapping):
            out.update(param_keys(value, dotted + "."))
    return out


def _key_problem(key: str, keys: Mapping[str, Any]) -> str | None:
    if key not in keys:
        leaves = [k for k, v in keys.items() if not isinstance(v, Mapping)]
        close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
        return f"params.yaml has no key `{key}`" + (f"; did you mean `{close[0]}`?" if close else "")
    if isinstance(keys[key], Mapping):
        return f"`{key}` is a section of params.yaml, not a value: override its keys one by one"
    if isinstance(keys[key], list):
        return f"`{key}` is a list in params.yaml: a sweep overrides scalars only"
    return None


_UNION_MEMBERS = {"bool", "int", "float", "str", "none"}


def _describe(error: Mapping[str, Any]) -> str:
    parts = [str(part) for part in error["loc"]]
    if parts and parts[-1] in _UNION_MEMBERS and "configs" in parts:  # one error per member of Scalar
        return (f"`{'.'.join(parts[:-1])}` must be a scalar (true/false, a number, a string or null), "
                f"got {error.get('input')!r}")
    loc = ".".join(parts)
    if error["type"] == "extra_forbidden":
        return f"unknown key `{loc}`"
    if error["type"] == "missing":
        return f"`{loc}` is missing: add it"
    message = str(error["msg"]).replace("Input should be", "must be")
    return f"`{loc}` {message} (got {error.get('input')!r})"


def parse_sweeps(data: Any, params: Mapping[str, Any], where: str | Path = SWEEPS_FILE) -> SweepsFile:
    """Validate the loaded content of a sweeps file against `params` (a loaded params.yaml).

    Every problem is collected into one `ParamsError` that names the file, the sweep, the config
    and the key.
    """
    if not isinstance(data, Mapping):
        raise ParamsError(f"{where}: expected a mapping with the keys seeds, copy_paths, sweeps; got {data!r}")
    try:
        sweeps = SweepsFile.model_validate(data)
    except ValidationError as exc:
        lines = list(dict.fromkeys(_describe(err) for err in exc.errors()))
        raise ParamsError(f"{where}: " + "; ".join(lines)) from None

    keys = param_keys(params)
    problems: list[str] = []
    for field in ("params", "sft_params"):
        for key in getattr(sweeps.seeds, field):
            if (problem := _key_problem(key, keys)) is not None:
                problems.append(f"seeds.{field}: {problem}")
    seed_keys = set(sweeps.seeds.params) | set(sweeps.seeds.sft_params)
    names: dict[str, str] = {}
    for sweep_name, sweep in sweeps.sweeps.items():
        at_sweep = f"sweeps.{sweep_name}"
        if not NAME_PATTERN.fullmatch(sweep_name):
            problems.append(f"{at_sweep}: the sweep name {sweep_name!r} is not lower-case words joined by '-'")
        duplicates = sorted({s for s in sweep.seeds if sweep.seeds.count(s) > 1})
        if duplicates:
            problems.append(f"{at_sweep}.seeds: seed {duplicates[0]} is given twice in {sweep.seeds}")
        negative = [s for s in sweep.seeds if s < 0]
        if negative:
            problems.append(f"{at_sweep}.seeds: seeds are >= 0, got {negative[0]}")
        for config, overrides in sweep.configs.items():
            at = f"{at_sweep}.configs.{config}"
            if not NAME_PATTERN.fullmatch(config):
                problems.append(f"{at}: the config name {config!r} is not lower-case words joined by '-'")
            for key, value in overrides.items():
                if (problem := _key_problem(key, keys)) is not None:
                    problems.append(f"{at}: {problem}")
                elif key in seed_keys:
                    problems.append(f"{at}: `{key}` is a seed key (seeds:); the sweep's seeds set it")
                elif isinstance(value, float) and not math.isfinite(value):
                    problems.append(f"{at}: `{key}` must be a finite number, got {value!r}")
            for s in sweep.seeds:
                name = experiment_name(sweep_name, config, s)
                if name in names and names[name] != at:
                    problems.append(f"{at}: experiment name {name!r} is also made by {names[name]}")
                names.setdefault(name, at)
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n" + "\n".join(
            f"  - {p}" for p in problems)
        raise ParamsError(f"{where}: {head}")
    return sweeps


def load_sweeps(path: str | Path = SWEEPS_FILE, params_path: str | Path = PARAMS_FILE) -> SweepsFile:
    """Read and validate a sweeps file against the params file at `params_path` (`parse_sweeps`)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: sweeps file not found (run from the repository root)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_sweeps(data, load_params(params_path), path)


# ---------------------------------------------------------------------------------------------
# Experiments and their commands


@dataclass(frozen=True)
class Experiment:
    """One (config, seed) of a sweep: its DVC experiment name and its param overrides, in order
    (the config's, then the seed keys')."""

    sweep: str
    config: str
    seed: int
    overrides: tuple[tuple[str, Scalar], ...]

    @property
    def name(self) -> str:
        return experiment_name(self.sweep, self.config, self.seed)

    @property
    def source(self) -> str:
        """Where `pipeline.compare` reads this experiment's predictions."""
        return f"rev:{self.name}"


def experiment_name(sweep: str, config: str, seed: int) -> str:
    """The DVC experiment name of one (config, seed) of a sweep: `<sweep>-<config>-s<seed>`."""
    return f"{sweep}-{config}-s{seed}"


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` → [0, 1, 2]; anything else (empty, not integers, negative, duplicates) is an error."""
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ParamsError(f"--seeds is a comma-separated list of integers (e.g. 0,1,2), got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise ParamsError(f"--seeds: seeds are >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ParamsError(f"--seeds: a seed is given twice in {text!r}")
    return seeds


def experiments(sweeps: SweepsFile, name: str, seeds: Sequence[int] | None = None) -> list[Experiment]:
    """The experiments of sweep `name` (with `seeds` instead of the file's, if given): seed by
    seed, the configs in file order within each seed, so a queue that stops early still holds
    every config at the first seeds."""
    sweep = sweeps.sweep(name)
    chosen = list(sweep.seeds if seeds is None else seeds)
    if not chosen or any(s < 0 for s in chosen) or len(set(chosen)) != len(chosen):
        raise ParamsError(f"seeds must be distinct integers >= 0, got {chosen}")
    keys = sweeps.seed_keys(sweep)
    return [Experiment(name, config, s, (*overrides.items(), *((k, s) for k in keys)))
            for s in chosen for config, overrides in sweep.configs.items()]


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
_RESERVED = {"true", "false", "null", "none", "nan", "inf"}


def format_value(value: Scalar) -> str:
    """A scalar as a Hydra override value (what `-S key=value` parses back to the same value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParamsError(f"a sweep value must be a finite number, got {value!r}")
        return repr(value)
    if _BARE.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    # Hydra's quoted strings: a backslash is literal except in a run before a quote or the end,
    # where each one is doubled; a quote is escaped with one.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m[1] * 2, value).replace("'", "\\'")
    return f"'{escaped}'"


def set_args(experiment: Experiment) -> list[str]:
    """`-S key=value` for every override of `experiment`, in order."""
    return [arg for key, value in experiment.overrides for arg in ("-S", f"{key}={format_value(value)}")]


def queue_command(experiment: Experiment, copy_paths: Sequence[str] = ()) -> list[str]:
    """The `dvc exp run --queue` argument list that queues `experiment`."""
    return ["dvc", "exp", "run", "--queue", "-n", experiment.name, *set_args(experiment),
            *(arg for path in copy_paths for arg in ("-C", path))]


START_COMMAND = ["dvc", "queue", "start", "--jobs", "1"]
STATUS_COMMAND = ["dvc", "queue", "status"]
LIST_COMMAND = ["dvc", "exp", "list", "--name-only"]


def existing_copy_paths(sweeps: SweepsFile, workspace: str | Path = ".") -> tuple[list[str], list[str]]:
    """The file's `copy_paths` split into (present under `workspace`, missing): `-C` of a missing path
    makes DVC fail the experiment, so only present ones are passed."""
    present = [p for p in sweeps.copy_paths if (Path(workspace) / p).exists()]
    return present, [p for p in sweeps.copy_paths if p not in present]


def check_values(sweeps: SweepsFile, experiments_: Iterable[Experiment], params_path: str | Path = PARAMS_FILE) -> None:
    """Apply each experiment's `-S` overrides to a copy of params.yaml with DVC's own writer and
    validate every section, as the stages will: a `ParamsError` names each bad experiment.

    Also checks that each value reads back as given (a string that Hydra would turn into a
    number, for instance), so the experiment runs with exactly the file's values.
    """
    from dvc.utils.hydra import apply_overrides

    from pipeline.params import SECTIONS, section_class, section_config

    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / PARAMS_FILE
        for experiment in experiments_:
            shutil.copy(params_path, copy)
            overrides = [a for a in set_args(experiment) if a != "-S"]
            try:
                apply_overrides(str(copy), overrides)
                params = load_params(copy)
            except Exception as exc:  # noqa: BLE001 - Hydra's parser errors have no common base
                problems.append(f"{experiment.name}: `dvc exp run -S` cannot apply {overrides}: {exc}")
                continue
            keys = param_keys(params)
            for key, value in experiment.overrides:
                got = keys.get(key)
                if got != value or type(got) is not type(value):
                    problems.append(f"{experiment.name}: `-S {key}={format_value(value)}` writes {got!r}, "
                                    f"not {value!r}")
            for section in SECTIONS:
                try:
                    section_config(section_class(section), params, section, source=experiment.name)
                except ParamsError as exc:
                    problems.append(str(exc))
    if problems:
        problems = list(dict.fromkeys(problems))
        raise ParamsError(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n"
                          + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Running DVC


@dataclass(frozen=True)
class Completed:
    """What a command returned: its exit status and its output (stdout and stderr together)."""

    returncode: int
    output: str


Runner = Callable[[Sequence[str]], Completed]


def subprocess_runner(cwd: str | Path | None = None) -> Runner:
    """A `Runner` that runs each argument list with `subprocess.run` (no shell) in `cwd`."""
    def run(args: Sequence[str]) -> Completed:
        proc = subprocess.run(list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        return Completed(proc.returncode, proc.stdout)
    return run


def _checked(run: Runner, args: Sequence[str]) -> str:
    result = run(args)
    if result.returncode != 0:
        raise SweepError(f"`{' '.join(args)}` failed (exit {result.returncode}):\n{result.output.strip()}")
    return result.output


@dataclass(frozen=True)
class QueueTask:
    """One row of `dvc queue status`."""

    task: str
    name: str
    status: str


def parse_queue_status(text: str) -> tuple[list[QueueTask], int | None]:
    """The task rows of `dvc queue status` output and the number of live workers (active + idle;
    None if the line is absent). A row is `Task  Name  Created  Status`; rows without a name are
    kept with name ''."""
    tasks: list[QueueTask] = []
    workers: int | None = None
    for line in text.splitlines():
        match = re.match(r"\s*Worker status:\s*(\d+) active,\s*(\d+) idle", line)
        if match:
            workers = int(match[1]) + int(match[2])
            continue
        parts = line.split()
        if len(parts) < 3 or parts[0] == "Task" or not re.fullmatch(r"[0-9a-f]{7,40}", parts[0]):
            continue
        status = parts[-1]
        if status not in (*ACTIVE, *DONE, "Unknown"):
            continue
        name = parts[1] if not re.fullmatch(r"\d\d:\d\d|[A-Z][a-z]{2}", parts[1]) else ""
        tasks.append(QueueTask(parts[0], name, status))
    return tasks, workers


def queue_status(run: Runner) -> tuple[list[QueueTask], int | None]:
    return parse_queue_status(_checked(run, STATUS_COMMAND))


def existing_experiments(run: Runner) -> set[str]:
    """The experiment names of the current baseline commit (`dvc exp list --name-only`)."""
    return {line.strip() for line in _checked(run, LIST_COMMAND).splitlines() if line.strip()}


@dataclass(frozen=True)
class Queued:
    """What `queue` did: the experiments it queued, those it skipped (already done or already in
    the queue), and the tasks that were finished before it ran (older runs of the same names)."""

    queued: list[Experiment]
    skipped: dict[str, str]
    finished_before: frozenset[str]


def queue(experiments_: Sequence[Experiment], run: Runner, echo: Callable[[str], None],
          copy_paths: Sequence[str] = ()) -> Queued:
    """Queue every experiment that has no DVC experiment of its name yet and is not queued or
    running already; print each command before running it."""
    done = existing_experiments(run)
    tasks, _ = queue_status(run)
    active = {t.name for t in tasks if t.status in ACTIVE}
    skipped: dict[str, str] = {}
    queued: list[Experiment] = []
    for experiment in experiments_:
        if experiment.name in done:
            skipped[experiment.name] = "already done (`dvc exp remove` it to run it again)"
        elif experiment.name in active:
            skipped[experiment.name] = "already in the queue"
        else:
            command = queue_command(experiment, copy_paths)
            echo(" ".join(command))
            _checked(run, command)
            queued.append(experiment)
    for name, why in skipped.items():
        echo(f"skipped {name}: {why}")
    return Queued(queued, skipped, frozenset(t.task for t in tasks if t.status in DONE))


def wait(names: Iterable[str], run: Runner, echo: Callable[[str], None], *, finished_before: frozenset[str],
         poll_s: float, sleep: Callable[[float], None] = time.sleep, stalled_polls: int = 3) -> dict[str, QueueTask]:
    """Poll `dvc queue status` until every experiment of `names` has finished; name → its task
    (status `Success` or `Failed`). Tasks in `finished_before` (older runs of the same names) are
    ignored. Raises `SweepError` when a name is not in the queue at all, or when no queue worker
    is left while some are still queued (`stalled_polls` polls in a row)."""
    waiting = list(dict.fromkeys(names))
    last: dict[str, str] = {}
    stalled = 0
    while True:
        tasks, workers = queue_status(run)
        state: dict[str, QueueTask] = {}
        for task in tasks:
            if task.name in waiting and task.task not in finished_before:
                # a finished run of this name wins over an older queued one
                if task.name not in state or task.status in DONE:
                    state[task.name] = task
        missing = [n for n in waiting if n not in state]
        if missing:
            raise SweepError(f"not in the DVC queue: {', '.join(missing)} (see `dvc queue status`)")
        for name in waiting:
            if last.get(name) != state[name].status:
                echo(f"{name}: {state[name].status}")
        last = {n: t.status for n, t in state.items()}
        if all(state[n].status in DONE for n in waiting):
            return {n: state[n] for n in waiting}
        running = any(state[n].status == "Running" for n in waiting)
        stalled = stalled + 1 if workers == 0 and not running else 0
        if stalled >= stalled_polls:
            left = [n for n in waiting if state[n].status not in DONE]
            raise SweepError(f"no DVC queue worker is running and {len(left)} experiment(s) are still queued "
                             f"({', '.join(left)}): start one with `dvc queue start --jobs 1`, or run the "
                             "sweep again (it skips what is done)")
        sleep(poll_s)


def run_sweep(experiments_: Sequence[Experiment], run: Runner, echo: Callable[[str], None], *,
              copy_paths: Sequence[str] = (), poll_s: float = 30.0,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, QueueTask]:
    """Queue the experiments (`queue`), start one queue worker (`dvc queue start --jobs 1`) and
    wait until every queued one has finished (name → its finished task); raise `SweepError`
    listing the failed ones with their queue task ids."""
    result = queue(experiments_, run, echo, copy_paths)
    waited = [e.name for e in result.queued] + [n for n, why in result.skipped.items() if why == "already in the queue"]
    if not waited:
        echo("nothing to run: every experiment of the sweep is done")
        return {}
    echo(" ".join(START_COMMAND))
    _checked(run, START_COMMAND)
    states = wait(waited, run, echo, finished_before=result.finished_before, poll_s=poll_s, sleep=sleep)
    failed = [t for t in states.values() if t.status == "Failed"]
    if failed:
        listed = ", ".join(f"{t.name} (task {t.task})" for t in failed)
        raise SweepError(f"{len(failed)} of {len(states)} experiment(s) failed: {listed}. See why with "
                         f"`dvc queue logs {failed[0].task}`; running the sweep again reruns only the failed "
                         "ones (the finished ones are skipped)")
    return states


# ---------------------------------------------------------------------------------------------
# The report


def report(
    sweeps: SweepsFile,
    name: str,
    baseline: str,
    *,
    seeds: Sequence[int] | None = None,
    resamples: int,
    bootstrap_seed: int,
    load: Callable[[str], Mapping[str, Any]] | None = None,
    skip_missing: bool = False,
) -> dict[str, Any]:
    """The comparison report (`pipeline.compare.compare_runs`) of every experiment of sweep `name`,
    each read as `rev:<experiment name>`, against `baseline` (`CONFIG/MODEL`, CONFIG a config of
    the sweep); with a `sweep` entry listing the experiments and those missing.

    `load(source)` returns a run's prediction tables (default `pipeline.compare.load_source`);
    with `skip_missing`, experiments that cannot be read are left out (and listed) instead of
    failing the report.
    """
    sweep = sweeps.sweep(name)
    config, _ = parse_baseline(baseline)
    if config not in sweep.configs:
        raise ParamsError(f"baseline config {config!r} is not a config of sweep {name!r} "
                          f"(configs: {', '.join(sweep.configs)})")
    loader = load or load_source
    runs: list[Run] = []
    missing: dict[str, str] = {}
    chosen = experiments(sweeps, name, seeds)
    for experiment in chosen:
        try:
            tables = loader(experiment.source)
        except (InputNotFoundError, FileNotFoundError) as exc:
            missing[experiment.name] = str(exc).splitlines()[0]
            continue
        runs.append(Run(experiment.config, experiment.seed, tables, experiment.source))
    if missing and (not skip_missing or not runs):
        first = next(iter(missing.values()))
        raise InputNotFoundError(
            f"{len(missing)} of {len(chosen)} experiment(s) of sweep {name!r} cannot be read: "
            f"{', '.join(missing)} (the first: {first}). Run the sweep (`sweep run {name}`), or leave them "
            "out with --skip-missing")
    result = compare_runs(runs, baseline, seed=bootstrap_seed, resamples=resamples)
    result["sweep"] = {
        "name": name, "help": sweep.help,
        "experiments": [{"name": e.name, "config": e.config, "seed": e.seed,
                         "overrides": {k: v for k, v in e.overrides}} for e in chosen],
        "missing": missing,
    }
    if missing:
        result["notes"] = [*result["notes"], f"left out (not readable): {', '.join(missing)}"]
    return result


def render_report(result: Mapping[str, Any]) -> str:
    """The sweep report as Markdown: what was run, then `pipeline.compare.render_markdown`."""
    sweep = result["sweep"]
    lines = [f"# Sweep `{sweep['name']}`: {sweep['help']}", "", "| experiment | config | seed | overrides |",
             "|---|---|---|---|"]
    for e in sweep["experiments"]:
        overrides = " ".join(f"`{k}={format_value(v)}`" for k, v in e["overrides"].items())
        state = " (missing)" if e["name"] in sweep["missing"] else ""
        lines.append(f"| `{e['name']}`{state} | {e['config']} | {e['seed']} | {overrides} |")
    body = re.sub(r"(?m)^#", "##", render_markdown(result))  # its headings one level down
    return "\n".join(lines) + "\n\n" + body


def write_report(result: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<out_dir>/<sweep>.json` and `<out_dir>/<sweep>.md`; return their paths."""
    from pipeline.reporting import write_json

    out_dir = Path(out_dir)
    name = result["sweep"]["name"]
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_json(json_path, dict(result))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(render_report(result))
    tmp.replace(md_path)
    return json_path, md_path
