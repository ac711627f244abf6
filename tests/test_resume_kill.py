"""kill -9 in the middle of `sft` and `train`, then a restart: the same bytes as an uninterrupted run.

Each stage script runs in a subprocess on the `tiny` profile with the options dvc.yaml gives it
(paths in a scratch folder), is killed with SIGKILL as soon as its first checkpoint is complete,
and is run again. The restart's model folder must equal, file by file and byte by byte, that of
an uninterrupted run in another folder, and its run report must show that the finished steps
were not run again. The stage runs directly, not through `dvc repro` (whose run cache would
hide the resume).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.schema import LESION_SCHEMA, POOL_SCHEMA, SCORED_SCHEMA, VQA_SCHEMA, write_rows
from tests.conftest import make_rows, stage_commands
from tests.test_preference import scored_rows, tiny

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _params(folder: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sft"].update(model="tiny", vision={}, vision_epochs=3, vision_batch_size=8, epochs=3, batch_size=8,
                         language_model="lora", lm_train_rows=None, system_prompt=None, checkpoint_every=4)
    params["train"].update(loss="mlpo", batch_size=2, epochs=3, lr=1e-3, max_rejected=3, grad_accum=1,
                           checkpoint_every=4, evaluate_after=True)
    params["sample"].update(k=3, batch_size=2)
    params["mine"].update(strategy="hard", size=12, hard={**params["mine"]["hard"], "batch_size": 2})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _workspace(folder: Path) -> Path:
    folder.mkdir(parents=True)
    _params(folder)
    write_rows(make_rows(48), folder / "data/prepared/train.parquet", VQA_SCHEMA)
    for root in ("models/base", "models/embedders"):
        (folder / root).mkdir(parents=True)
    tiny().save(folder / "models/sft")
    pool = [{**r, "mine_strategy": "random", "mine_score": None, "mine_reason": None} for r in make_rows(24)]
    write_rows(pool, folder / "data/pool.parquet", POOL_SCHEMA)
    write_rows([], folder / "data/prepared/lesions.parquet", LESION_SCHEMA)
    write_rows(scored_rows(24), folder / "data/scored.parquet", SCORED_SCHEMA)
    return folder


def _argv(stage: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.stages.{stage}", *stage_commands()[stage]]


def _run(stage: str, cwd: Path) -> None:
    done = subprocess.run(_argv(stage), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_after_first_checkpoint(stage: str, cwd: Path, work: Path, pattern: str = "*/checkpoint-*") -> Path:
    """Run the stage and SIGKILL it as soon as `work` holds a finished `pattern` (a checkpoint, a part)."""
    process = subprocess.Popen(_argv(stage), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            done = [p for p in work.glob(pattern) if not p.name.endswith(".tmp")] if work.exists() else []
            if done:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return done[0]
            if process.poll() is not None:
                pytest.fail(f"{stage} ended before its first checkpoint: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        pytest.fail(f"{stage} wrote no checkpoint in time")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("stage", "output", "work"), [
    ("sft", "models/sft", "data/work/sft"),
    ("train", "models/aligned", "data/work/train"),
])
def test_a_killed_stage_resumes_to_the_same_bytes(tmp_path, stage, output, work):
    whole = _workspace(tmp_path / "whole")
    killed = _workspace(tmp_path / "killed")
    if stage == "sft":  # its output is the model the workspace already holds for `train`
        for root in (whole, killed):
            subprocess.run(["rm", "-r", str(root / "models/sft")], check=True)
    _run(stage, whole)

    checkpoint = _kill_after_first_checkpoint(stage, killed, killed / work)
    assert not (killed / output).exists() or stage == "train" and not (killed / output / "config.json").exists()
    _run(stage, killed)

    assert _files(killed / output) == _files(whole / output)
    assert (killed / f"reports/{stage}.json").read_bytes() == (whole / f"reports/{stage}.json").read_bytes()
    for name in ("metrics.json",):
        live = f"reports/live/{stage}/{name}"
        assert (killed / live).read_bytes() == (whole / live).read_bytes()
    assert _files(killed / f"reports/live/{stage}/plots") == _files(whole / f"reports/live/{stage}/plots")
    whole_run = json.loads((whole / f"reports/timings/{stage}.json").read_text())
    resumed_run = json.loads((killed / f"reports/timings/{stage}.json").read_text())
    step = int(checkpoint.name.rsplit("-", 1)[1])
    if stage == "sft":
        assert whole_run["resumed_from"] is None and resumed_run["resumed_from"] is not None
        # Killed in phase 1 at its first checkpoint (step 4 of 18): steps 5.. of phase 1 and all of phase 2 ran.
        assert checkpoint.name.startswith("checkpoint-phase1-")
        assert resumed_run["steps_run"] == whole_run["steps_run"] - step
    else:
        assert resumed_run["resumed_from_step"] == step
        assert resumed_run["steps_run"] == whole_run["steps_run"] - step
        assert resumed_run["reference_batches_reused"] == 0  # the finished table was read back whole
    assert list((killed / work).iterdir()) == []  # the checkpoints are gone once the output is saved


@pytest.mark.parametrize(("stage", "output", "work"), [
    ("sample", "data/candidates.parquet", "data/work/sample"),
    ("mine", "data/pool.parquet", "data/work/mine"),  # strategy hard: the SFT model answers the split
])
def test_a_killed_batch_stage_resumes_to_the_same_bytes(tmp_path, stage, output, work):
    whole = _workspace(tmp_path / "whole")
    killed = _workspace(tmp_path / "killed")
    _run(stage, whole)
    _kill_after_first_checkpoint(stage, killed, killed / work, "*/part-*.parquet")
    parts_at_kill = len(list((killed / work).glob("*/part-*.parquet")))
    _run(stage, killed)

    assert (killed / output).read_bytes() == (whole / output).read_bytes()
    assert (killed / f"reports/{stage}.json").read_bytes() == (whole / f"reports/{stage}.json").read_bytes()
    resumed_run = json.loads((killed / f"reports/timings/{stage}.json").read_text())
    counts = resumed_run if stage == "sample" else resumed_run["reuse"]["answers"]
    assert counts["reused"] >= parts_at_kill >= 1  # the finished batches were not computed again
    assert counts["computed"] == counts["batches"] - counts["reused"]
    assert not (killed / work).exists() or list((killed / work).iterdir()) == []


def test_a_kill_during_the_final_write_leaves_no_output_a_later_stage_accepts(tmp_path):
    """`write_folder` (how sft and train write their model folder): SIGKILL while it writes."""
    from pipeline.models.profiles import check_model_folder

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.reporting import write_folder\n"
        "def write(folder):\n"
        "    (folder / 'config.json').write_text('{}')\n"
        "    (folder / 'model.safetensors').write_bytes(b'partial')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "write_folder(Path(sys.argv[1]), write)\n"
    )
    output = tmp_path / "models" / "aligned"
    process = subprocess.Popen([sys.executable, "-c", script, str(output)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists()
    from pipeline.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="model folder not found"):
        check_model_folder(output)
