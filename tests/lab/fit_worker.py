"""One rank of the lab's training loop, run by tests/lab/test_lab_torchrun.py (not a test).

Usage: ``python fit_worker.py OUT.json`` alone, or under ``torchrun --nproc-per-node N``.
Trains a small batch-norm MLP on MNIST-1D through ``bnorm.lab.train.fit`` and (rank 0) writes
the history and the running statistics.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import torch
from torch import nn

import bnorm
from bnorm import distributed as bd
from bnorm.lab.data import mnist1d
from bnorm.lab.train import fit, seed_all


def main(out: str) -> None:
    torch.set_num_threads(1)
    # process_group_from_env leaves the gloo group after every rank is done: a group still alive
    # at interpreter exit can abort a rank that had nothing left to do ("terminate called
    # without an active exception", seen in CI when this worker called init_from_env alone).
    with bd.process_group_from_env(timeout=60):
        record = _train()
        if bd.is_main_process():
            record["world_size"] = bd.world_size()
            with open(out, "w") as f:
                json.dump(record, f)


def _train() -> dict:
    generator = seed_all(0)
    model = nn.Sequential(nn.Linear(40, 32), bnorm.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(
        model,
        mnist1d(),
        steps=30,
        batch_size=33,
        optimizer=optimizer,
        generator=generator,
        eval_every=10,
    )
    bn = model[1]
    assert type(bn) is bnorm.BatchNorm1d  # the local layer is back after the fit
    record = history.to_json()
    record["running_mean"] = bn.running_mean.tolist()
    record["running_var"] = bn.running_var.tolist()
    record["num_batches_tracked"] = int(bn.num_batches_tracked)
    return record


if __name__ == "__main__":
    # An abort (SIGABRT, "terminate called without an active exception") was seen twice in CI
    # on one rank, even with the group destroyed before exit, and never reproduced here: the
    # Python stacks of every thread then go to stderr, which the test prints on failure.
    faulthandler.enable()
    main(sys.argv[1])
    # Leave without the interpreter's finalization, where gloo's worker threads may still
    # release tensors (pytorch/pytorch#179291 describes that abort); the result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
