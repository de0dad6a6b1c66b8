"""The lab's training loop under `torchrun --nproc-per-node 2` equals one-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("fit_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_fit_data_parallel_matches_one_process(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    alone, parallel = tmp_path / "alone.json", tmp_path / "parallel.json"
    subprocess.run([sys.executable, str(WORKER), str(alone)], check=True, timeout=120, env=env)
    # --standalone: the rendezvous listens on a port the OS picks; 33 samples per global batch
    # give uneven shards (17 + 16), which the loss scaling must handle.
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(WORKER), str(parallel)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = json.loads(alone.read_text()), json.loads(parallel.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["steps"] == two["steps"] == [10, 20, 30]
    assert one["num_batches_tracked"] == two["num_batches_tracked"] == 30
    # Same global batches, same statistics, same gradients: equal up to float rounding.
    np.testing.assert_allclose(two["running_mean"], one["running_mean"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two["running_var"], one["running_var"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["test_acc"], one["test_acc"], atol=0.003)


def test_lab_command_under_torchrun_writes_once_and_resumes(tmp_path):
    """`torchrun --nproc-per-node 2 -m bnorm lab run ...`: rank 0 alone writes and prints, the
    numbers match a one-process run, and a second run resumes (every rank skips the seed)."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    args = ["lab", "run", "sigmoid", "--quick", "--seeds", "1", "--max-seeds", "1", "--no-progress"]
    parallel, alone = tmp_path / "parallel", tmp_path / "alone"
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "bnorm", *args]
    done = subprocess.run(
        [*command, "--out", str(parallel)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("report:") == 1  # only rank 0 prints
    assert json.loads((parallel / "lab.json").read_text())["world_size"] == 2
    subprocess.run(
        [sys.executable, "-m", "bnorm", *args, "--out", str(alone)],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    two = json.loads((parallel / "sigmoid" / "summary.json").read_text())["numbers"]
    one = json.loads((alone / "sigmoid" / "summary.json").read_text())["numbers"]
    for variant in ("BN", "no BN"):
        for depth, acc in one[variant]["median_final_by_depth"].items():
            assert abs(two[variant]["median_final_by_depth"][depth] - acc) <= 0.01
    seed_file = parallel / "sigmoid" / "seed-0.json"
    before = seed_file.stat().st_mtime_ns
    again = subprocess.run(
        [*command, "--out", str(parallel)], capture_output=True, text=True, timeout=300, env=env
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert seed_file.stat().st_mtime_ns == before  # resumed, not retrained
