"""pipeline.sweeps and the sweep command: sweeps.yaml's validation, the exact `dvc exp run --queue`
argument lists, the queue bookkeeping against a fake DVC, and the report over fake `rev:` reads.
Nothing here runs DVC's queue."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.errors import InputNotFoundError, ParamsError
from pipeline.params import _Loader, load_params, project_params_path
from pipeline.stages.sweep import app
from pipeline.sweeps import (
    Completed,
    QueueTask,
    SweepError,
    check_values,
    experiment_name,
    experiments,
    format_value,
    load_sweeps,
    parse_queue_status,
    parse_seeds,
    parse_sweeps,
    project_sweeps_path,
    queue,
    queue_command,
    report,
    run_sweep,
    write_report,
)
from tests.test_compare import DEFAULT_SEED0, DEFAULT_SEED1, HARD_SEED7, _metrics_report, table_rows

PARAMS = load_params(project_params_path())
PAPER_SWEEPS = {"seeds", "hscr-table4", "hscr-table5", "hscr-table6", "mmedpo-weights", "loss", "nll-only"}


def project() -> dict:
    return yaml.safe_load(project_sweeps_path().read_text())


def minimal(**sweeps: dict) -> dict:
    return {"seeds": {"params": ["sample.seed", "train.seed"], "sft_params": ["sft.seed"]},
            "copy_paths": [],
            "sweeps": sweeps or {"s": {"help": "h", "retrain_sft": False, "seeds": [0], "configs": {"c": {}}}}}


def sweep(seeds: object = (0, 1), retrain_sft: bool = False, **configs: dict) -> dict:
    return {"help": "a sweep", "retrain_sft": retrain_sft, "seeds": list(seeds) if isinstance(seeds, tuple) else seeds,
            "configs": configs or {"default": {}}}


# ---------------------------------------------------------------------------------------------
# The file


def test_project_file_is_valid_and_holds_the_papers_sweeps() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    assert PAPER_SWEEPS <= set(sweeps.sweeps)
    assert sweeps.seeds.params == ["sample.seed", "train.seed"] and sweeps.seeds.sft_params == ["sft.seed"]
    # The timings reports are not DVC outputs, so a queued experiment needs no copied files.
    assert sweeps.copy_paths == []
    assert sweeps.sweep("seeds").seeds == [0, 1, 2] and sweeps.sweep("seeds").configs == {"default": {}}
    assert sweeps.sweep("hscr-table4").configs == {"explicit-only": {"train.implicit": False},
                                                   "implicit-only": {"train.explicit": False}, "both": {}}
    assert [c["sample.mask_strategy"] for c in sweeps.sweep("hscr-table5").configs.values()] == [
        "token", "pixel", "patch", "latent"]
    assert [c["mask_ratio"] for c in sweeps.sweep("hscr-table6").configs.values()] == [0.3, 0.5, 0.7, 0.9]
    assert sorted(c["train.weighted"] for c in sweeps.sweep("mmedpo-weights").configs.values()) == [False, True]
    assert sorted((c["train.loss"], c["train.nll_weight"]) for c in sweeps.sweep("loss").configs.values()) == [
        ("dpo", 0.0), ("dpo", 1.0), ("mlpo", 0.0), ("mlpo", 1.0)]
    # The NLL-only control of docs/results.md: the preference terms off through gamma -> 0.
    assert sweeps.sweep("nll-only").configs == {"default": {}, "anchor-only": {"train.gamma": 1e-6}}
    # Only a sweep that says so retrains SFT.
    assert [n for n, s in sweeps.sweeps.items() if s.retrain_sft] == ["seeds-sft"]


def test_every_experiment_of_the_project_file_passes_the_stages_validation() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    check_values(sweeps, [e for name in sweeps.sweeps for e in experiments(sweeps, name)], project_params_path())


def test_a_bad_value_fails_before_anything_is_queued(tmp_path: Path) -> None:
    data = minimal(bad=sweep((0,), typo={"sample.mask_strategy": "pixle"}, neg={"mask_ratio": 1.5}))
    sweeps = parse_sweeps(data, PARAMS)
    with pytest.raises(ParamsError) as info:
        check_values(sweeps, experiments(sweeps, "bad"), project_params_path())
    message = str(info.value)
    assert "2 problems" in message
    assert "bad-typo-s0" in message and "sample.mask_strategy" in message and "pixle" in message
    assert "bad-neg-s0" in message and "mask_ratio" in message
    # A string Hydra would read back as another type is caught too (it would run another value).
    sweeps = parse_sweeps(minimal(s=sweep((0,), c={"sft.system_prompt": "Answer: yes, or no."})), PARAMS)
    check_values(sweeps, experiments(sweeps, "s"), project_params_path())  # quoted: reads back as given


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.update(colour="red"), "unknown key `colour`"),
    (lambda d: d["seeds"].update(extra=["x"]), "unknown key `seeds.extra`"),
    (lambda d: d["sweeps"]["s"].update(seed=[0]), "unknown key `sweeps.s.seed`"),
    (lambda d: d["sweeps"]["s"].pop("retrain_sft"), "`sweeps.s.retrain_sft` is missing"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"train.gama": 0.5}),
     "sweeps.s.configs.c: params.yaml has no key `train.gama`; did you mean `train.gamma`?"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"mask_ration": 0.5}),
     "params.yaml has no key `mask_ration`; did you mean `mask_ratio`?"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"train": 1}), "`train` is a section of params.yaml"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"train.lora_targets": "q_proj"}), "is a list"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"train.lr": [0.1, 0.2]}),
     "`sweeps.s.configs.c.train.lr` must be a scalar"),
    (lambda d: d["sweeps"]["s"]["configs"]["c"].update({"train.seed": 3}), "`train.seed` is a seed key"),
    (lambda d: d["seeds"].update(params=["sample.sed"]), "seeds.params: params.yaml has no key `sample.sed`"),
    (lambda d: d["sweeps"]["s"].update(seeds=[0, 1, 0]), "sweeps.s.seeds: seed 0 is given twice in [0, 1, 0]"),
    (lambda d: d["sweeps"]["s"].update(seeds=[-1]), "sweeps.s.seeds: seeds are >= 0, got -1"),
    (lambda d: d["sweeps"]["s"].update(seeds=[0, "1"]), "`sweeps.s.seeds.1` must be a valid integer"),
    (lambda d: d["sweeps"]["s"].update(seeds=[True]), "`sweeps.s.seeds.0` must be a valid integer"),
    (lambda d: d["sweeps"]["s"].update(seeds=[]), "`sweeps.s.seeds` List should have at least 1 item"),
    (lambda d: d["sweeps"]["s"].update(seeds="0,1"), "`sweeps.s.seeds` must be a valid list"),
    (lambda d: d["sweeps"]["s"]["configs"].update({"Big Name": {}}), "the config name 'Big Name'"),
    (lambda d: d["sweeps"].update({"s_1": d["sweeps"]["s"]}), "the sweep name 's_1'"),
])
def test_the_file_is_validated_strictly(change, expected) -> None:
    data = copy.deepcopy(minimal())
    change(data)
    with pytest.raises(ParamsError, match="^sweeps.yaml: ") as info:
        parse_sweeps(data, PARAMS)
    assert expected in str(info.value)


def test_all_problems_are_listed_at_once_and_experiment_names_may_not_collide() -> None:
    data = minimal(**{"a-b": sweep((0,), c={}), "a": sweep((0,), **{"b-c": {"train.nope": 1, "sample.nope": 2}})})
    with pytest.raises(ParamsError) as info:
        parse_sweeps(data, PARAMS)
    message = str(info.value)
    assert message.startswith("sweeps.yaml: 3 problems:")
    assert "`train.nope`" in message and "`sample.nope`" in message
    assert "experiment name 'a-b-c-s0' is also made by sweeps.a-b.configs.c" in message


def test_load_sweeps_reads_files_and_names_them(tmp_path: Path) -> None:
    path = tmp_path / "sweeps.yaml"
    data = minimal(s=sweep((0,), c={"train.gamma": "1e-6"}))
    path.write_text(yaml.safe_dump(data).replace("'1e-6'", "1e-6"))  # YAML 1.1 reads 1e-6 as a string
    assert load_sweeps(path, project_params_path()).sweep("s").configs["c"]["train.gamma"] == 1e-6
    with pytest.raises(InputNotFoundError, match="sweeps file not found"):
        load_sweeps(tmp_path / "nope.yaml", project_params_path())
    path.write_text("seeds: [")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_sweeps(path, project_params_path())
    path.write_text("- 1\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_sweeps(path, project_params_path())
    with pytest.raises(ParamsError, match="no sweep named 'hscr-tabel4'; did you mean 'hscr-table4'"):
        load_sweeps(project_sweeps_path(), project_params_path()).sweep("hscr-tabel4")


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(" 3 ") == [3]
    for bad, message in (("0,x", "comma-separated list of integers"), ("", "comma-separated"),
                         ("1,-2", ">= 0"), ("1,1", "given twice")):
        with pytest.raises(ParamsError, match=message):
            parse_seeds(bad)


# ---------------------------------------------------------------------------------------------
# Experiments and commands


def test_exact_queue_commands_top_level_mask_ratio_included() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    copy = ["models/base/llava-med", "data/work/judge_cache.sqlite"]  # git-ignored inputs, as a user may list
    commands = [queue_command(e, copy) for e in experiments(sweeps, "hscr-table6", [0, 1])]
    assert commands[0] == ["dvc", "exp", "run", "--queue", "-n", "hscr-table6-ratio-0.3-s0",
                           "-S", "mask_ratio=0.3", "-S", "sample.seed=0", "-S", "train.seed=0",
                           "-C", "models/base/llava-med", "-C", "data/work/judge_cache.sqlite"]
    assert [c[5] for c in commands] == [f"hscr-table6-ratio-0.{r}-s{s}" for s in (0, 1) for r in (3, 5, 7, 9)]
    assert commands[7][6:12] == ["-S", "mask_ratio=0.9", "-S", "sample.seed=1", "-S", "train.seed=1"]

    (both,) = [e for e in experiments(sweeps, "hscr-table4", [2]) if e.config == "both"]
    assert queue_command(both) == ["dvc", "exp", "run", "--queue", "-n", "hscr-table4-both-s2",
                                   "-S", "sample.seed=2", "-S", "train.seed=2"]
    explicit = experiments(sweeps, "hscr-table4", [0])[0]
    assert queue_command(explicit)[6:] == ["-S", "train.implicit=false", "-S", "sample.seed=0", "-S", "train.seed=0"]
    loss = {e.config: queue_command(e)[6:10] for e in experiments(sweeps, "loss", [0])}
    assert loss["dpo-no-nll"] == ["-S", "train.loss=dpo", "-S", "train.nll_weight=0.0"]
    (anchor,) = [e for e in experiments(sweeps, "nll-only", [1]) if e.config == "anchor-only"]
    assert queue_command(anchor)[6:8] == ["-S", "train.gamma=1e-06"]
    # A sweep that retrains SFT writes the seed to sft.seed too.
    assert queue_command(experiments(sweeps, "seeds-sft", [1])[0])[4:] == [
        "-n", "seeds-sft-default-s1", "-S", "sample.seed=1", "-S", "train.seed=1", "-S", "sft.seed=1"]


def test_experiment_names_are_unique_and_stable() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    every = [e for name in sweeps.sweeps for e in experiments(sweeps, name)]
    names = [e.name for e in every]
    assert len(names) == len(set(names))
    assert all(e.name == experiment_name(e.sweep, e.config, e.seed) == f"{e.sweep}-{e.config}-s{e.seed}"
               and e.source == f"rev:{e.name}" for e in every)
    again = load_sweeps(project_sweeps_path(), project_params_path())
    assert [e.name for name in again.sweeps for e in experiments(again, name)] == names
    assert [e.name for e in experiments(sweeps, "hscr-table4")] == [
        f"hscr-table4-{c}-s{s}" for s in (0, 1, 2) for c in ("explicit-only", "implicit-only", "both")]
    with pytest.raises(ParamsError, match="distinct"):
        experiments(sweeps, "seeds", [0, 0])


@pytest.mark.parametrize("value", [True, False, None, 0, 3, 0.3, 1.0, 1e-6, 2.5e10, "token", "models/base/x",
                                   "Answer in one word.", "true", "null", "1e-3", "it's", "a=b", "[x]", "", "a\\b",
                                   "a\\'b", "end\\", "x y,z"])
def test_values_read_back_through_dvcs_own_writer(tmp_path: Path, value) -> None:
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text("sec:\n  key: 0\n")
    apply_overrides(str(path), [f"sec.key={format_value(value)}"])
    got = yaml.load(path.read_text(), Loader=_Loader)["sec"]["key"]  # as pipeline.params reads it
    assert got == value and type(got) is type(value)


# ---------------------------------------------------------------------------------------------
# The queue, against a fake DVC


STATUS_SAMPLE = """\
Task     Name                      Created    Status
42b5881  nll-only-anchor-only-s0   04:02 AM   Failed
ab217ca  nll-only-anchor-only-s0   Jan 05, 2025   Running
b94561d  hscr-table6-ratio-0.3-s0  04:01 AM   Success
c94561d                            04:01 AM   Queued

Worker status: 1 active, 0 idle
"""


def test_parse_queue_status() -> None:
    tasks, workers = parse_queue_status(STATUS_SAMPLE)
    assert tasks == [QueueTask("42b5881", "nll-only-anchor-only-s0", "Failed"),
                     QueueTask("ab217ca", "nll-only-anchor-only-s0", "Running"),
                     QueueTask("b94561d", "hscr-table6-ratio-0.3-s0", "Success"),
                     QueueTask("c94561d", "", "Queued")]
    assert workers == 1
    assert parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n") == ([], 0)


class FakeDvc:
    """Answers `dvc exp list`, `dvc exp run --queue`, `dvc queue start` and `dvc queue status`
    like DVC would, running each queued experiment over a few status polls."""

    def __init__(self, done: Sequence[str] = (), old: Sequence[QueueTask] = (), fail: Sequence[str] = (),
                 workers_die: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.done = set(done)
        self.tasks: list[QueueTask] = list(old)
        self.fail = set(fail)
        self.started = False
        self.workers_die = workers_die

    def __call__(self, args: Sequence[str]) -> Completed:
        args = list(args)
        self.calls.append(args)
        if args[:3] == ["dvc", "exp", "list"]:
            return Completed(0, "".join(f"{n}\n" for n in sorted(self.done)))
        if args[:4] == ["dvc", "exp", "run", "--queue"]:
            name = args[args.index("-n") + 1]
            self.tasks.append(QueueTask(f"{len(self.tasks):07x}", name, "Queued"))
            return Completed(0, f"Queued experiment '{name}' for future execution.\n")
        if args[:3] == ["dvc", "queue", "start"]:
            self.started = True
            return Completed(0, "Started '1' new experiments task queue worker.\n")
        if args[:3] == ["dvc", "queue", "status"]:
            text = "Task     Name    Created    Status\n" + "".join(
                f"{t.task}  {t.name}  04:01 AM   {t.status}\n" for t in self.tasks)
            workers = 1 if self.started and not self.workers_die else 0
            self._advance()
            return Completed(0, text + f"\nWorker status: {workers} active, 0 idle\n")
        raise AssertionError(f"unexpected command {args}")

    def _advance(self) -> None:  # one task moves one step per poll: Queued -> Running -> done
        if not self.started or self.workers_die:
            return
        for i, t in enumerate(self.tasks):
            if t.status == "Running":
                self.tasks[i] = QueueTask(t.task, t.name, "Failed" if t.name in self.fail else "Success")
                return
            if t.status == "Queued":
                self.tasks[i] = QueueTask(t.task, t.name, "Running")
                return


def test_queue_runs_one_command_per_experiment_and_skips_done_and_queued_ones() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    chosen = experiments(sweeps, "mmedpo-weights", [0, 1])
    dvc = FakeDvc(done=["mmedpo-weights-weighted-s0"], old=[QueueTask("aaaaaaa", "mmedpo-weights-unweighted-s1",
                                                                      "Queued")])
    printed: list[str] = []
    result = queue(chosen, dvc, printed.append, ["models/base/llava-med"])
    assert [e.name for e in result.queued] == ["mmedpo-weights-unweighted-s0", "mmedpo-weights-weighted-s1"]
    assert result.skipped == {"mmedpo-weights-weighted-s0": "already done (`dvc exp remove` it to run it again)",
                              "mmedpo-weights-unweighted-s1": "already in the queue"}
    queued = [c for c in dvc.calls if c[:4] == ["dvc", "exp", "run", "--queue"]]
    assert queued == [queue_command(e, ["models/base/llava-med"]) for e in result.queued]
    assert printed[:2] == [" ".join(c) for c in queued]

    fresh = FakeDvc()

    def failing(args: Sequence[str]) -> Completed:
        return Completed(255, "ERROR: Experiment conflicts with existing experiment") if "--queue" in args \
            else fresh(args)
    with pytest.raises(SweepError, match="(?s)exit 255.*conflicts"):
        queue(chosen, failing, printed.append)


def test_run_waits_for_every_experiment_and_lists_the_failed_ones() -> None:
    sweeps = load_sweeps(project_sweeps_path(), project_params_path())
    chosen = experiments(sweeps, "hscr-table4", [0])
    old = [QueueTask("fffffff", "hscr-table4-both-s0", "Failed")]  # an earlier failed run of the same name
    dvc = FakeDvc(old=old)
    printed: list[str] = []
    sleeps: list[float] = []
    states = run_sweep(chosen, dvc, printed.append, copy_paths=[], poll_s=7, sleep=sleeps.append)
    assert {n: t.status for n, t in states.items()} == {e.name: "Success" for e in chosen}
    assert ["dvc", "queue", "start", "--jobs", "1"] in dvc.calls
    assert set(sleeps) == {7} and "hscr-table4-both-s0: Running" in printed

    dvc = FakeDvc(fail=["hscr-table4-implicit-only-s0"])
    with pytest.raises(SweepError) as info:
        run_sweep(chosen, dvc, printed.append, poll_s=0, sleep=lambda s: None)
    assert "1 of 3 experiment(s) failed: hscr-table4-implicit-only-s0 (task 0000001)" in str(info.value)
    assert "dvc queue logs 0000001" in str(info.value)

    # Nothing left to run: no worker is started.
    dvc = FakeDvc(done=[e.name for e in chosen])
    assert run_sweep(chosen, dvc, printed.append, poll_s=0, sleep=lambda s: None) == {}
    assert not dvc.started

    # Workers gone while experiments are still queued: a clear error rather than waiting forever.
    dvc = FakeDvc(workers_die=True)
    with pytest.raises(SweepError, match="no DVC queue worker is running and 3 experiment"):
        run_sweep(chosen, dvc, printed.append, poll_s=0, sleep=lambda s: None)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"a dry run ran {args}")


def _cli_project(tmp_path: Path) -> Path:
    shutil.copy(project_sweeps_path(), tmp_path / "sweeps.yaml")
    shutil.copy(project_params_path(), tmp_path / "params.yaml")
    return tmp_path


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_cli_project(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    # The project file copies nothing: no -C, no note.
    result = CliRunner().invoke(app, ["run", "seeds", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "dvc exp run --queue -n seeds-default-s0 -S sample.seed=0 -S train.seed=0",
        "dvc exp run --queue -n seeds-default-s1 -S sample.seed=1 -S train.seed=1",
        "dvc exp run --queue -n seeds-default-s2 -S sample.seed=2 -S train.seed=2",
        "dvc queue start --jobs 1"]
    assert "copy path" not in result.stderr

    # Copy paths of a user's file: -C for those that exist, a note for a missing one (-C of it would
    # fail the experiment).
    data = project()
    data["copy_paths"] = ["models/base/llava-med", "data/work/judge_cache.sqlite"]
    (tmp_path / "sweeps.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "models" / "base" / "llava-med").mkdir(parents=True)
    result = CliRunner().invoke(app, ["queue", "hscr-table6", "--seeds", "0,1", "--dry-run"])
    assert result.exit_code == 0, result.output
    sweeps = load_sweeps()
    expected = [" ".join(queue_command(e, ["models/base/llava-med"]))
                for e in experiments(sweeps, "hscr-table6", [0, 1])]
    assert result.stdout.splitlines() == expected
    assert "dvc exp run --queue -n hscr-table6-ratio-0.3-s0 -S mask_ratio=0.3 -S sample.seed=0 " \
           "-S train.seed=0 -C models/base/llava-med" in result.stdout
    assert "copy path data/work/judge_cache.sqlite does not exist" in result.stderr

    bad = CliRunner().invoke(app, ["queue", "seeds", "--seeds", "0,0", "--dry-run"])
    assert isinstance(bad.exception, ParamsError) and "given twice" in str(bad.exception)
    listed = CliRunner().invoke(app, ["list", "hscr-table5"])
    assert listed.exit_code == 0 and "hscr-table5-latent-s2" in listed.stdout


# ---------------------------------------------------------------------------------------------
# The report, over fake `rev:` reads


def _tables(models: dict) -> dict:
    return {m: table_rows(m, closed, open_) for m, (closed, open_) in models.items()}


def test_report_reads_every_experiment_as_a_rev_and_compares_them(tmp_path: Path) -> None:
    sweeps = parse_sweeps(minimal(ab=sweep((0, 1), base={}, hard={"mine.strategy": "hard"})), PARAMS)
    data = {"rev:ab-base-s0": _tables(DEFAULT_SEED0), "rev:ab-base-s1": _tables(DEFAULT_SEED1),
            "rev:ab-hard-s0": _tables(HARD_SEED7), "rev:ab-hard-s1": _tables(HARD_SEED7)}
    asked: list[str] = []

    def load(source: str) -> dict:
        asked.append(source)
        return data[source]

    result = report(sweeps, "ab", "base/sft", resamples=99, bootstrap_seed=0, load=load)
    assert asked == ["rev:ab-base-s0", "rev:ab-hard-s0", "rev:ab-base-s1", "rev:ab-hard-s1"]
    assert result["baseline"] == "base/sft"
    assert [(r["config"], r["seed"], r["source"]) for r in result["runs"]] == [
        ("base", 0, "rev:ab-base-s0"), ("hard", 0, "rev:ab-hard-s0"), ("base", 1, "rev:ab-base-s1"),
        ("hard", 1, "rev:ab-hard-s1")]
    (row,) = [r for r in result["rows"] if (r["config"], r["model"], r["metric"]) == ("base", "aligned",
                                                                                      "closed_accuracy")]
    assert row["per_seed"] == {"0": 0.75, "1": 1.0}
    assert result["sweep"]["experiments"][1] == {"name": "ab-hard-s0", "config": "hard", "seed": 0, "overrides": {
        "mine.strategy": "hard", "sample.seed": 0, "train.seed": 0}}

    json_path, md_path = write_report(result, tmp_path / "reports" / "sweeps")
    assert json_path == tmp_path / "reports" / "sweeps" / "ab.json" and json.loads(json_path.read_text())["sweep"][
        "name"] == "ab"
    text = md_path.read_text()
    assert text.startswith("# Sweep `ab`: a sweep")
    assert "| `ab-hard-s0` | hard | 0 | `mine.strategy=hard` `sample.seed=0` `train.seed=0` |" in text
    assert "## Run comparison against base/sft" in text and "### closed accuracy" in text

    # Missing experiments: listed all at once, or left out with skip_missing.
    del data["rev:ab-hard-s1"], data["rev:ab-base-s1"]

    def partial(source: str) -> dict:
        if source not in data:
            raise InputNotFoundError(f"reports/metrics.json at {source[4:]!r}: cannot read it through DVC")
        return data[source]

    with pytest.raises(InputNotFoundError, match=r"2 of 4 experiment\(s\) of sweep 'ab' cannot be read: "
                                                 "ab-base-s1, ab-hard-s1"):
        report(sweeps, "ab", "base/sft", resamples=99, bootstrap_seed=0, load=partial)
    result = report(sweeps, "ab", "base/sft", resamples=99, bootstrap_seed=0, load=partial, skip_missing=True)
    assert sorted(result["sweep"]["missing"]) == ["ab-base-s1", "ab-hard-s1"]
    assert "left out (not readable): ab-base-s1, ab-hard-s1" in result["notes"]
    with pytest.raises(ParamsError, match="baseline config 'default' is not a config of sweep 'ab'"):
        report(sweeps, "ab", "default/sft", resamples=99, bootstrap_seed=0, load=load)


def test_report_command_reads_revs_through_dvc_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI end to end, with `pipeline.compare.dvc_read` (the only DVC access) faked."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import PREDICTION_SCHEMA

    monkeypatch.chdir(_cli_project(tmp_path))
    runs = {"seeds-default-s0": DEFAULT_SEED0, "seeds-default-s1": DEFAULT_SEED1}
    reads: list[tuple[str, str]] = []

    def fake_dvc_read(path: str, rev: str, repo: str | None = None) -> bytes:
        reads.append((path, rev))
        if rev not in runs:
            raise InputNotFoundError(f"{path} at {rev!r}: unknown")
        if path == "reports/metrics.json":
            return json.dumps(_metrics_report(list(runs[rev]))).encode()
        model = Path(path).stem
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(_tables({model: runs[rev][model]})[model], schema=PREDICTION_SCHEMA), buf)
        return buf.getvalue()

    monkeypatch.setattr("pipeline.compare.dvc_read", fake_dvc_read)
    result = CliRunner().invoke(app, ["report", "seeds", "--seeds", "0,1", "--baseline", "default/sft",
                                      "--resamples", "99"])
    assert result.exit_code == 0, result.output
    assert ("reports/metrics.json", "seeds-default-s0") in reads and (
        "reports/predictions/aligned.parquet", "seeds-default-s1") in reads
    md = (tmp_path / "reports" / "sweeps" / "seeds.md").read_text()
    assert md in result.stdout and "| default | aligned | 0, 1 | 87.5 ± 17.7 |" in md
    assert json.loads((tmp_path / "reports" / "sweeps" / "seeds.json").read_text())["seed"] == 0

    missing = CliRunner().invoke(app, ["report", "seeds", "--baseline", "default/sft", "--resamples", "99"])
    assert isinstance(missing.exception, InputNotFoundError)
    assert "seeds-default-s2" in str(missing.exception) and "--skip-missing" in str(missing.exception)
