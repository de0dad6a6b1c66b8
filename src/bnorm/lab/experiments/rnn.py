"""Experiment ``rnn``: batch normalization in a recurrent network.

MNIST-1D read as 40 time steps of one value, classified from an LSTM's last hidden state.
Compared: torch's LSTM; bnorm's BN-LSTM (Cooijmans et al. 2016: separate statistics per time
step on the input-to-hidden and hidden-to-hidden terms and on the cell, γ initialised to 0.1),
the same with γ = 1.0 (the paper's ablation: γ = 1 saturates the gates' tanh early on), and an
LSTM with layer normalization in the same places (Ba et al. 2016), which needs no batch at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...modules import BNLSTM
from ..data import mnist1d
from ..experiment import JSON, Decision, Experiment, Summary, all_of, check, median, spread
from ..models import censored, seeded, train
from ..plots import band_plot

MARGIN = 0.02  # two points of accuracy


class LayerNormLSTM(nn.Module):
    """A one-layer LSTM with LayerNorm on the gates' pre-activation and on the cell.

    Ba et al. (2016) normalize W_x·x and W_h·h separately; with one input feature, as here,
    normalizing W_x·x over its 4H units leaves only the sign of x (W_x·x is a multiple of
    W_x's column), so the gates' sum W_x·x + W_h·h is normalized instead.
    Input (T, B, I); returns (output (T, B, H), (h, c)) like ``torch.nn.LSTM``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.h2h = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.ln_gates = nn.LayerNorm(4 * hidden_size)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = x.new_zeros(x.shape[1], self.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in x:
            gates = self.ln_gates(self.x2h(x_t) + self.h2h(h))
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class SequenceClassifier(nn.Module):
    """(N, 40) → (40, N, 1) → recurrent cell → last hidden state → Linear → 10 logits."""

    def __init__(self, cell: nn.Module, hidden: int) -> None:
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.cell(x.t().unsqueeze(-1))
        return self.head(output[-1])


def _model(variant: str, hidden: int) -> nn.Module:
    if variant == "LSTM":
        cell: nn.Module = nn.LSTM(1, hidden)
    elif variant == "BN-LSTM γ=0.1":
        cell = BNLSTM(1, hidden, max_steps=40, gamma_init=0.1)
    elif variant == "BN-LSTM γ=1.0":
        cell = BNLSTM(1, hidden, max_steps=40, gamma_init=1.0)
    elif variant == "LN-LSTM":
        cell = LayerNormLSTM(1, hidden)
    else:
        raise ValueError(variant)
    return SequenceClassifier(cell, hidden)


VARIANTS = ("LSTM", "BN-LSTM γ=0.1", "BN-LSTM γ=1.0", "LN-LSTM")


def config(quick: bool) -> JSON:
    return {
        "hidden": 32,
        "steps": 150 if quick else 1000,  # BN-LSTM: ~25 ms a step
        "eval_every": 50 if quick else 100,
        "batch_size": 64,
        "lr": 3e-3,
        "target": 0.5,
    }


def run(seed: int, cfg: JSON) -> JSON:
    data = mnist1d()
    out: JSON = {}
    for variant in VARIANTS:
        model = seeded(seed, lambda v=variant: _model(v, cfg["hidden"]))
        history = train(
            model,
            data,
            seed=seed,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            optimizer="adam",
            eval_every=cfg["eval_every"],
        )
        result = history.to_json()
        result["first_step"] = history.first_step_at(cfg["target"])
        out[variant] = result
    return out


def summarize(results: Sequence[JSON], cfg: JSON) -> Summary:
    numbers: JSON = {}
    rows = []
    for variant in VARIANTS:
        finals = [r[variant]["final_test_acc"] for r in results]
        firsts = [r[variant]["first_step"] for r in results]
        numbers[variant] = {
            "median_final_test_acc": median(finals),
            "median_steps": median([censored(f, cfg["steps"]) for f in firsts]),
        }
        rows.append(
            {
                "model": variant,
                "final test acc": spread(finals),
                f"steps to {cfg['target']:.0%}": spread(firsts, "{:.0f}"),
            }
        )

    def diff(r: JSON, a: str, b: str) -> float:
        return r[a]["final_test_acc"] - r[b]["final_test_acc"]

    # Paired by seed: every variant sees the seed's batches (weights differ by architecture).
    numbers["per_seed"] = {
        "careful_minus_lstm": [diff(r, "BN-LSTM γ=0.1", "LSTM") for r in results],
        "careful_minus_naive": [diff(r, "BN-LSTM γ=0.1", "BN-LSTM γ=1.0") for r in results],
    }
    acc = {v: numbers[v]["median_final_test_acc"] for v in VARIANTS}
    headline = "median final test accuracy: " + ", ".join(f"{v} {a:.3f}" for v, a in acc.items())
    return Summary(numbers, headline, rows)


def decide(numbers: Mapping[str, Any]) -> Decision:
    # The claim is that BN in RNNs is "not straightforward": BN helps a recurrent network only
    # with RNN-specific care (per-step statistics, γ = 0.1). So the careful BN-LSTM must beat
    # the plain LSTM, and the naive γ = 1.0 must lose much of that gain.
    per_seed = numbers["per_seed"]
    return all_of(
        check(
            "final test acc, BN-LSTM γ=0.1 − LSTM", per_seed["careful_minus_lstm"], MARGIN, "above"
        ),
        check(
            "final test acc, BN-LSTM γ=0.1 − γ=1.0",
            per_seed["careful_minus_naive"],
            MARGIN,
            "above",
        ),
    )


def plot(results: Sequence[JSON], cfg: JSON, directory: Path) -> list[str]:
    return [
        band_plot(
            directory / "rnn-accuracy.png",
            results[0]["LSTM"]["steps"],
            {v: [r[v]["test_acc"] for r in results] for v in VARIANTS},
            title=f"MNIST-1D as 40-step sequences, hidden {cfg['hidden']}: test accuracy",
            xlabel="training step",
            ylabel="test accuracy (eval mode)",
        )
    ]


EXPERIMENT = Experiment(
    name="rnn",
    title="Batch normalization in recurrent networks",
    claim=(
        "For instance, in recurrent neural networks (RNNs), applying batch normalization is not "
        "straightforward due to the temporal dynamics of RNNs."
    ),
    setup=(
        "MNIST-1D (4,000 train, 1,000 test) read as 40 steps of 1 value; one-layer recurrent "
        "network (hidden 32), last hidden state → Linear → 10 classes; Adam lr 3e-3, batch 64. "
        "torch.nn.LSTM vs bnorm.BNLSTM (per-step BN statistics, γ = 0.1) vs BNLSTM with γ = 1.0 "
        "vs a LayerNorm LSTM. Accuracy in eval mode (BN-LSTM: per-step running statistics)."
    ),
    rule=(
        "Per seed: BN-LSTM γ=0.1's final test accuracy − the LSTM's (care helps), and − BN-LSTM "
        "γ=1.0's (the care matters). Supported if the 95% intervals of both means lie above "
        "+0.02; not supported if either lies wholly below +0.02; inconclusive otherwise. The "
        "LayerNorm LSTM is shown, not judged."
    ),
    config=config,
    run=run,
    summarize=summarize,
    decide=decide,
    plot=plot,
    seeds=(2, 3),
    max_seeds=(3, 6),
)
