"""The full default-profile pipeline with DVC, in a scratch clone (minutes): `pytest -m slow`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import sh

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_dvc_repro_and_incremental_reruns(tmp_path):
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not on PATH")
    work = tmp_path / "repo"
    sh(f"git clone -q {REPO} {work}", tmp_path)
    out = sh("dvc repro", work)
    # No deprecation warning caused by our own calls (current transformers / peft APIs).
    assert "FutureWarning" not in out and "DeprecationWarning" not in out, out[-3000:]
    metrics = json.loads((work / "reports/metrics.json").read_text())
    sft, blind = metrics["sft"], metrics["sft_blind"]
    assert sft["closed_accuracy"] - blind["closed_accuracy"] >= 0.10  # the SFT model uses the image
    assert abs(blind["closed_accuracy"] - 0.5) < 0.1  # its blind control stays near chance
    assert "aligned" in metrics and "aligned_minus_sft" in metrics

    # Same lock, same bytes: the fresh clone's dvc.lock equals the committed one, line for line (no
    # output varies between runs: the timings are not DVC outputs).
    committed = yaml.safe_load(sh("git show HEAD:dvc.lock", work))["stages"]
    fresh = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert fresh.keys() == committed.keys()
    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"stages whose dvc.lock entry changed on a fresh clone: {changed}"

    # A second repro does nothing.
    out = sh("dvc repro", work)
    assert "Running stage" not in out

    # An `evaluate` param reruns only the evaluations (and `report`, if one changed).
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"]["open"] += 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", work)
    assert "Running stage 'evaluate@sft'" in out and "Running stage 'evaluate@aligned'" in out
    for stage in ("prepare", "sft", "mine", "sample", "rerank", "score", "train"):
        assert f"Running stage '{stage}'" not in out

    # A `train` param retrains and evaluates the aligned model only: the SFT evaluation is cached.
    params["train"]["epochs"] += 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", work)
    assert "Running stage 'train'" in out and "Running stage 'evaluate@aligned'" in out
    assert "Running stage 'report'" in out and "Running stage 'evaluate@sft'" not in out

    # `mask_ratio` reruns `sample` and what follows it, never prepare, sft or mine.
    status = sh("dvc status", work)
    params["mask_ratio"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh("dvc status", work)
    assert "sample:" in status
    for stage in ("prepare", "sft", "mine"):
        assert f"{stage}:" not in status


@pytest.mark.slow
def test_html_report_renders_offline_in_headless_chromium(tmp_path, monkeypatch):
    """The tiny pipeline's page, opened from disk in headless Chromium with every network request
    refused (a proxy that does not exist, every host unresolvable): the DOM holds every section and
    a screenshot is a real image, so the page needs nothing from a network."""
    import subprocess

    from tests.test_pipeline_tiny import run, save_tiny_judge, tiny_params

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    save_tiny_judge(tmp_path / "models/judges/tiny")
    for folder in ("models/base", "models/embedders", "data/raw"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params("models/judges/tiny")))
    monkeypatch.chdir(tmp_path)
    for stage in ("prepare", "sft", "mine", "sample", "rerank", "score", "train", "evaluate@sft",
                  "evaluate@aligned", "report", "html_report"):
        run(stage)
    page = (tmp_path / "reports/html/index.html").as_uri()
    offline = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([*offline, "--dump-dom", page], capture_output=True, text=True, timeout=180, check=True).stdout
    for element in ('id="metrics"', 'id="plots"', 'id="preferences"', "<svg", "<mark", "<details>",
                    'src="data:image/png;base64,', "<footer>"):
        assert element in dom, element
    assert "http://" not in dom.replace('xmlns="http://www.w3.org/2000/svg"', "")  # the parser adds the SVG namespace
    shot = tmp_path / "report.png"
    subprocess.run([*offline, f"--screenshot={shot}", "--window-size=1280,2000", page], capture_output=True,
                   timeout=180, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
