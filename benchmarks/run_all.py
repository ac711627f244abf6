"""Every benchmark against its peer, one after another, then one summary table.

    python benchmarks/run_all.py                      # run them all (about 25 min on 2 CPU cores)
    python benchmarks/run_all.py --summary-only       # rebuild the table from the saved JSON
    python benchmarks/run_all.py --profile-repo /tmp/clone   # also profile a whole `dvc repro`

Runs, in this order and one at a time (they time themselves; nothing else should run):
`train_vs_trl.py --profile demo`, the same against TRL with its default gradient checkpointing,
`eval_vs_generate.py`, `sample_vs_generate.py`, `memory_7b.py` at `llava-med-7b:layers=1` on the
CPU, and, with `--profile-repo`, `profile_repro.py`. Each writes its JSON under reports/benchmarks/. The summary
(`reports/benchmarks/summary.md`) is also written into docs/results.md between the
`<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->` markers, so the docs show the numbers
of the last run and nothing typed by hand.

Needs models/sft and data/prepared (after `dvc repro` or `dvc pull`); without them the
benchmarks build a fresh demo model and phantom rows and say so in their JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import REPORTS, ROOT  # noqa: E402

app = typer.Typer(add_completion=False)
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _latest(name: str) -> tuple[str, dict] | None:
    """The most recent run of reports/benchmarks/<name>.json on a real model (not `tiny`)."""
    path = REPORTS / f"{name}.json"
    if not path.exists():
        return None
    runs = json.loads(path.read_text())["runs"]
    real = [k for k in runs if not k.startswith("tiny")]
    if not real:
        return None
    key = max(real, key=lambda k: runs[k].get("measured_at", ""))
    return key, runs[key]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def summary_rows() -> list[list[str]]:
    rows = []
    for file, name, label in (("train_vs_trl", "dpo_j3", "DPO, J = 3 pairs/entry"),
                              ("train_vs_trl", "mlpo_vs_trl_all_ranked_pairs", "MLPO vs TRL on all ranked pairs"),
                              ("train_vs_trl_checkpointed", "dpo_j3_trl_checkpointed",
                               "DPO, J = 3, TRL with its default gradient checkpointing")):
        trl = _latest(file)
        if not trl or name not in trl[1]["speedup_vs_trl"]:
            continue
        r = trl[1]
        s = r["speedup_vs_trl"][name]
        ours, peer = r["results"][s["ours"]], r["results"][s["trl"]]
        memory = r["peak_memory_ratio"].get(name, {}).get("peak")
        target = r["targets"].get(name)
        verdict = "met" if target and target.get("met") else "not met"
        rows.append([
            f"training: {label}", r["device"], f"{ours['entries_per_second']:.2f} entries/s",
            f"TRL {r['trl_version']} DPOTrainer: {peer['entries_per_second']:.2f} entries/s",
            f"{s['entries_per_second']:.1f}×",
            (f"≥ 10× at ≤ 60% memory: {verdict} (memory {memory:.2f}×)" if target else f"memory {memory:.2f}×")
            if memory is not None else "≥ 10×",
            f"{_pct(ours['utilization']['fraction_of_measured_peak'])} / "
            f"{_pct(peer['utilization']['fraction_of_measured_peak'])}",
            "same first-step loss" if (r.get("first_step_loss_check") or {}).get("agree") else "—",
        ])
    ev = _latest("eval_vs_generate")
    if ev:
        key, r = ev
        rows.append([
            f"evaluation: {r['questions']} questions", r["device"],
            f"{r['batched']['questions_per_second']:.2f} questions/s",
            f"`generate`, one at a time: {r['generate']['questions_per_second']:.2f} questions/s",
            f"{r['speedup']:.1f}×", f"≥ {r['speedup_target']}×: {'met' if r['meets_target'] else 'not met'}",
            f"{_pct(r['batched']['fraction_of_measured_peak'])} / {_pct(r['generate']['fraction_of_measured_peak'])}",
            "identical predictions" if r["identical_predictions"] else "DIFFERENT",
        ])
    sv = _latest("sample_vs_generate")
    if sv:
        key, r = sv
        ours, peer = r["two_view_decode"], r["generate"]
        rows.append([
            f"decode-mode sampling: {r['entries']} entries", r["device"], f"{ours['tokens_per_second']:.1f} tokens/s",
            f"`generate`, doubled batch + logits processor: {peer['tokens_per_second']:.1f} tokens/s",
            f"{r['speedup']:.2f}×", f"≥ {r['speedup_target']}×: {'met' if r['meets_target'] else 'not met'}",
            f"{_pct(ours['fraction_of_measured_peak'])} / {_pct(peer['fraction_of_measured_peak'])}",
            "identical tokens" if r["identical_continuations"] else "DIFFERENT",
        ])
    return rows


def summary_markdown() -> str:
    rows = summary_rows()
    header = ["benchmark", "device", "ours", "peer", "speedup", "target", "share of measured matmul peak "
              "(ours / peer)", "outputs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    profile = _latest("profile_repro")
    if profile:
        _, r = profile
        stages = sorted(r["stages"].items(), key=lambda kv: kv[1]["wall_seconds"], reverse=True)
        lines += ["", f"Where the default `dvc repro` spends its time ({r['device']}, "
                      f"{r['total_wall_seconds'] / 60:.1f} min under cProfile, `benchmarks/profile_repro.py`):", "",
                  "| stage | seconds | share | top self time |", "|---|---|---|---|"]
        for name, s in stages:
            top = ", ".join(f"{f['function']} {f['self_share'] * 100:.0f}%" for f in s["top_self_time"][:3])
            lines.append(f"| {name} | {s['wall_seconds']:.0f} | {s['share_of_total'] * 100:.0f}% | {top} |")
    lines += ["", "Generated by `python benchmarks/run_all.py` from `reports/benchmarks/*.json`."]
    return "\n".join(lines) + "\n"


def write_summary(docs: Path) -> str:
    text = summary_markdown()
    (REPORTS / "summary.md").write_text(text)
    page = docs.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{docs} has no {BEGIN} ... {END} block to fill")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return text


@app.command()
def main(
    summary_only: bool = typer.Option(False, help="only rebuild the summary from the saved JSON"),
    profile_repo: Path = typer.Option(None, help="a clone with the pipeline's outputs: also profile its stages"),
    threads: int = typer.Option(1, help="torch threads of every benchmark"),
    docs: Path = typer.Option(ROOT / "docs" / "results.md", help="the page whose benchmarks block is rewritten"),
) -> None:
    commands = [
        ["train_vs_trl.py", "--profile", "demo", "--threads", str(threads)],
        ["train_vs_trl.py", "--profile", "demo", "--threads", str(threads), "--methods",
         "ours_dpo,trl_dpo_checkpointed", "--out", str(REPORTS / "train_vs_trl_checkpointed.json")],
        ["eval_vs_generate.py", "--threads", str(threads)],
        ["sample_vs_generate.py", "--threads", str(threads)],
        # The 7B memory benchmark at one layer of every width on a CPU (about two minutes), so it
        # cannot rot; on a GPU run the full shape by hand (docs/benchmarks.md).
        ["memory_7b.py", "--model", "llava-med-7b:layers=1", "--entries", "2", "--batch-size", "2",
         "--device", "cpu", "--threads", str(threads)],
    ]
    if profile_repo is not None:
        commands.append(["profile_repro.py", "--repo", str(profile_repo)])
    if not summary_only:
        for script, *args in commands:
            typer.echo(f"== {script} {' '.join(args)}", err=True)
            done = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                raise SystemExit(f"{script} failed ({done.returncode})")
    typer.echo(write_summary(docs))


if __name__ == "__main__":
    app()
