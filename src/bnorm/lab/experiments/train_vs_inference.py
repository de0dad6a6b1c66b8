"""Experiment ``train-vs-inference``: the gap between batch statistics and running statistics.

In training, batch normalization uses each batch's statistics; at inference, running averages.
When training batches are not i.i.d. (here every batch holds only 2 of the 10 classes) and the
running averages move fast (momentum 0.5 in PyTorch's convention: half of each update comes
from the last batch), the running statistics describe the last few batches, not the data, and
inference degrades. ``bnorm.precise_bn`` recomputes them exactly over i.i.d. training batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...tools import precise_bn
from ...tools.doctor import doctor
from ..data import Dataset, mnist5k
from ..experiment import JSON, Decision, Experiment, Summary, check, median, spread
from ..models import mlp, seeded, train
from ..plots import band_plot
from ..train import Sampler, accuracy

GAP = 0.05  # five points of accuracy


def two_class_batches(labels: torch.Tensor, batch_size: int) -> Sampler:
    """Batches of ``batch_size`` drawn from only two (random) classes each; about one epoch."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]

    def sample(n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        half = batch_size // 2
        for _ in range(n // batch_size):
            a, b = torch.randperm(len(by_class), generator=generator)[:2].tolist()
            pick = [
                by_class[c][torch.randint(len(by_class[c]), (half,), generator=generator)]
                for c in (a, b)
            ]
            yield torch.cat(pick)

    return sample


def train_mode_accuracy(model: torch.nn.Module, data: Dataset, batch_size: int) -> float:
    """Test accuracy with *batch* statistics of i.i.d. test batches (on a copy of the model)."""
    twin = copy.deepcopy(model).train()
    order = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(0))
    correct = 0
    with torch.no_grad():
        for idx in order.split(batch_size):
            correct += int((twin(data.x_test[idx]).argmax(1) == data.y_test[idx]).sum())
    return correct / len(data.x_test)


def doctor_rules(
    model: torch.nn.Module, data: Dataset, sampler: Sampler | None, cfg: JSON
) -> list[str]:
    """What ``bnorm.doctor`` finds on the trained model over one epoch of its training batches
    (as its sampler draws them): the rules that fired, worst first."""
    generator = torch.Generator().manual_seed(1)
    n = len(data.x_train)
    if sampler is None:
        order = torch.randperm(n, generator=generator).split(cfg["batch_size"])
    else:
        order = list(sampler(n, generator))
    diagnosis = doctor(model, [data.x_train[i] for i in order])
    return list(dict.fromkeys(f.rule for f in diagnosis.findings))


def config(quick: bool) -> JSON:
    return {
        "steps": 300 if quick else 1000,
        "eval_every": 100,
        "batch_size": 60,
        "lr": 0.1,
        "momentum": 0.5,
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist5k()
    out: JSON = {}
    samplers = {
        "i.i.d.": None,
        "2 classes per batch": two_class_batches(data.y_train, cfg["batch_size"]),
    }
    for name, sampler in samplers.items():
        model = seeded(seed, lambda: mlp([784, 100, 100, 10], bn=True, momentum=cfg["momentum"]))
        history = train(
            model,
            data,
            seed=seed,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            eval_every=cfg["eval_every"],
            sampler=sampler,
        )
        precise = copy.deepcopy(model)
        iid = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
        precise_bn(precise, [data.x_train[i] for i in iid.split(cfg["batch_size"])])
        out[name] = {
            "steps": history.steps,
            "test_acc": history.test_acc,
            "eval_acc": accuracy(model, data.x_test, data.y_test),
            "train_mode_acc": train_mode_accuracy(model, data, cfg["batch_size"]),
            "precise_acc": accuracy(precise, data.x_test, data.y_test),
            "seconds": history.seconds,
            "doctor": doctor_rules(model, data, sampler, cfg),
        }
    return out


KEYS = ("train_mode_acc", "eval_acc", "precise_acc")
LABELS = {
    "train_mode_acc": "train mode (batch stats)",
    "eval_acc": "eval mode (EMA stats)",
    "precise_acc": "eval after precise_bn",
}


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    numbers: JSON = {}
    rows = []
    for name in results[0]:
        numbers[name] = {k: median([r[name][k] for r in results]) for k in KEYS}
        rows.append(
            {
                "training batches": name,
                **{LABELS[k]: spread([r[name][k] for r in results]) for k in KEYS},
                "bnorm.doctor finds (first seed)": ", ".join(results[0][name].get("doctor", []))
                or "nothing",
            }
        )
    n = numbers["2 classes per batch"]
    n["gap"] = n["train_mode_acc"] - n["eval_acc"]
    n["precise_gain"] = n["precise_acc"] - n["eval_acc"]
    # Paired within each seed: the same trained model evaluated both ways.
    two = "2 classes per batch"
    numbers["per_seed"] = {"gap": [r[two]["train_mode_acc"] - r[two]["eval_acc"] for r in results]}
    headline = (
        f"2 classes per batch, momentum {cfg['momentum']}: train-mode {n['train_mode_acc']:.3f} "
        f"vs eval-mode {n['eval_acc']:.3f} test accuracy (gap {n['gap']:+.3f}); precise_bn "
        f"{n['precise_acc']:.3f} ({n['precise_gain']:+.3f}); i.i.d. batches: eval "
        f"{numbers['i.i.d.']['eval_acc']:.3f}"
    )
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    return check(
        "train-mode − eval-mode test acc, 2-class batches", numbers["per_seed"]["gap"], GAP, "above"
    ).decision()


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    return [
        band_plot(
            directory / "train-vs-inference.png",
            results[0]["i.i.d."]["steps"],
            {
                f"eval-mode test acc, {name} batches": [r[name]["test_acc"] for r in results]
                for name in results[0]
            },
            title=f"Eval-mode (running statistics) test accuracy, momentum {cfg['momentum']}",
            xlabel="training step",
            ylabel="test accuracy",
        )
    ]


EXPERIMENT = Experiment(
    name="train-vs-inference",
    title="The train/inference discrepancy",
    claim=(
        "Furthermore, batch normalization can potentially introduce a discrepancy between the "
        "training and inference stages. During training, the mean and variance are calculated "
        "for each mini-batch, but during inference, an average of these statistics is used. "
        "This discrepancy can sometimes lead to performance degradation."
    ),
    setup=(
        "784-100-100-10 ReLU MLP with BatchNorm1d (momentum 0.5) on 5,000 real MNIST digits, "
        "batch 60, SGD lr 0.1; training batches either i.i.d. or from 2 classes each. After "
        "training: test accuracy in train mode (statistics of i.i.d. test batches of 60, on a "
        "copy), in eval mode (running statistics), and in eval mode after bnorm.precise_bn over "
        "the training set in i.i.d. batches."
    ),
    rule=(
        "Per seed: gap = train-mode − eval-mode test accuracy of the model trained on 2-class "
        "batches. Supported if the 95% interval of the mean gap lies above +0.05; not "
        "supported if it lies wholly below +0.05; inconclusive otherwise. What precise_bn "
        "recovers is reported, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 5),
)
