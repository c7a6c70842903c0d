"""tools/gpu_check.sh --dry-run runs every step of the GPU check on the CPU at tiny sizes, and
tools/prepare_gpu_wheels.sh answers --help without fetching anything."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_gpu_wheels_help_names_its_knobs_and_fetches_nothing(tmp_path):
    dest = tmp_path / "wheels"
    p = subprocess.run(["bash", "tools/prepare_gpu_wheels.sh", "--help", "--dest", str(dest)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for word in ("tools/prepare_gpu_wheels.sh", "--python-version", "--dest", "--budget-mib", "pb1-detectron2"):
        assert word in p.stdout, word
    assert "[wheels]" not in p.stdout and not dest.exists()  # usage only: nothing fetched or made
    bad = subprocess.run(["bash", "tools/prepare_gpu_wheels.sh", "--no-such-flag"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_config_and_amp(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(out))
    p = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=400)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    report = (out / "gpu_check.md").read_text()
    assert report in p.stdout  # printed as written
    rows = {}
    for line in report.splitlines():
        m = re.match(r"\| (box-only|SIM) R\d+ \([\w.-]+\.yaml\) \| (off|bf16) \| ([0-9.]+) \| ([0-9]+) \|$", line)
        if m:
            rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)))
    assert set(rows) == {(c, a) for c in ("box-only", "SIM") for a in ("off", "bf16")}, report
    assert all(s > 0 and mib > 0 for s, mib in rows.values()), rows
    # every step ran or was skipped on purpose, and left its log
    assert "FAILED" not in report, report
    for step in ("test", "msda", "train"):
        assert re.search(rf"^\| {step} \| ok \|", report, re.M), report
        assert (out / f"{step}.log").is_file()
    assert re.search(r"^\| build \| skipped", report, re.M)
    assert "| fp32 | torch reference |" in report and "| bf16 | torch reference |" in report
