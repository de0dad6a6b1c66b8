"""`torchrun --nproc-per-node 2 -m bnorm demo`: data-parallel training with SyncBatchNorm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bnorm import demo

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_demo_under_torchrun_matches_single_process_training(tmp_path):
    out = tmp_path / "demo"
    # --standalone: torchrun's rendezvous store listens on a port the OS picks (port 0).
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "bnorm", "demo"]
    command += ["--seeds", "1", "--epochs", "2", "--out", str(out), "--no-progress"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    # only rank 0 reports
    assert done.stdout.count("| BN before ReLU |") == 1, done.stdout
    assert "Data-parallel over 2 processes" in done.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == list(demo.VARIANTS)
    # The global batch stays 32, so training follows the single-process run: the same
    # accuracies up to a rare flip of a point near the boundary from float rounding.
    data = demo.load_circles()
    for run in runs:
        alone = demo.train_one(run["variant"], seed=0, epochs=2, data=data)
        for key in ("train_acc", "test_acc"):
            for got, want in zip(run[key], getattr(alone, key), strict=True):
                assert abs(got - want) <= 0.01, (run["variant"], key, run[key], want)
