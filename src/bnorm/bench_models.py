"""``bnorm bench``'s end-to-end section: whole models with torch's BatchNorm and with bnorm's.

Two models, each built once and converted with :func:`bnorm.convert` (the same weights):

- ``resnet18``: a ResNet-18 (torchvision's layout: BasicBlocks [2, 2, 2, 2], widths 64-512)
  on an (8, 3, 64, 64) input, where batch norm is a small share of the step;
- ``mlp``: a batch-norm-heavy MLP, 8 x (Linear(1024) + BatchNorm1d + ReLU), batch 256.

For each: the eager training step (forward, backward) and evaluation, as paired ratios
``time(bnorm) / time(torch)`` (medians of round-by-round ratios, the two alternating in one
process); with ``compile``, the same under ``torch.compile(fullgraph=True)`` (bnorm's layers
take their composite path there, which inductor fuses); and the peak resident memory of a
fresh process running training steps with each (ratio bnorm/torch).
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

import bnorm

__all__ = ["MODELS", "bn_mlp", "measure_model", "peak_rss_ratio", "resnet18"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + skip)


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 as torchvision lays it out (20 BatchNorm2d layers), written here because
    torchvision's wheel does not import beside the CPU build of torch."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def bn_mlp(width: int = 1024, depth: int = 8) -> nn.Module:
    """``depth`` x (Linear(width) + BatchNorm1d + ReLU): batch norm is a large share."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers)


#: name -> (builder, input shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (resnet18, (8, 3, 64, 64)),
    "mlp": (bn_mlp, (256, 1024)),
}


def _pair(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    theirs = build()
    ours = bnorm.convert(copy.deepcopy(theirs))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return ours, theirs, x


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        model(x).square().mean().backward()

    return step


def _ratios(
    fns: dict[str, Callable[[], object]], reps: int, alternate: Callable
) -> tuple[float, float, float]:
    """(median ms of bnorm, median ms of torch, median of the round-by-round ratios)."""
    t = alternate(fns, reps)
    ratio = statistics.median(a / b for a, b in zip(t["bnorm"], t["torch"], strict=True))
    return statistics.median(t["bnorm"]) * 1e3, statistics.median(t["torch"]) * 1e3, ratio


def measure_model(name: str, reps: int, compile: bool, alternate: Callable) -> dict[str, object]:
    """One row: eager (and compiled) training step and evaluation, bnorm over torch."""
    ours, theirs, x = _pair(name)
    row: dict[str, object] = {"model": name, "input": "x".join(map(str, x.shape))}
    modes = [("eager", ours, theirs)]
    if compile:
        torch._dynamo.reset()
        modes.append(
            (
                "compile",
                torch.compile(ours, fullgraph=True),
                torch.compile(theirs, fullgraph=True),
            )
        )
    for mode, a, b in modes:
        ours.train()
        theirs.train()
        ms_a, ms_b, r = _ratios(
            {"bnorm": _train_step(a, x), "torch": _train_step(b, x)}, reps, alternate
        )
        row |= {f"{mode}_train_bnorm_ms": ms_a, f"{mode}_train_torch_ms": ms_b}
        row[f"{mode}_train_bnorm_over_torch"] = r
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            ms_a, ms_b, r = _ratios(
                {"bnorm": lambda a=a: a(x), "torch": lambda b=b: b(x)}, reps, alternate
            )
        row |= {f"{mode}_eval_bnorm_ms": ms_a, f"{mode}_eval_torch_ms": ms_b}
        row[f"{mode}_eval_bnorm_over_torch"] = r
    return row


def _rss_child(name: str, which: str, steps: int) -> None:
    """``python -m bnorm.bench_models NAME bnorm|torch STEPS``: peak RSS (KiB) of training."""
    ours, theirs, x = _pair(name)
    model = ours if which == "bnorm" else theirs
    del ours, theirs
    step = _train_step(model.train(), x)
    for _ in range(steps):
        step()
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss_ratio(name: str, steps: int = 5, runs: int = 3) -> dict[str, float]:
    """Peak resident memory of a fresh process training ``name`` with bnorm's layers and with
    torch's, alternating over ``runs`` pairs: medians (MiB) and the median ratio."""
    peaks: dict[str, list[float]] = {"bnorm": [], "torch": []}
    for _ in range(runs):
        for which in peaks:
            done = subprocess.run(
                [sys.executable, "-m", "bnorm.bench_models", name, which, str(steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[which].append(json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"])
    ratio = statistics.median(a / b for a, b in zip(peaks["bnorm"], peaks["torch"], strict=True))
    return {
        "rss_bnorm_mib": statistics.median(peaks["bnorm"]) / 1024,
        "rss_torch_mib": statistics.median(peaks["torch"]) / 1024,
        "rss_bnorm_over_torch": ratio,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    """The section's table: ratios bnorm/torch (below 1: bnorm faster or smaller)."""
    cols = [
        ("eager_train_bnorm_over_torch", "train, eager"),
        ("eager_eval_bnorm_over_torch", "eval, eager"),
        ("compile_train_bnorm_over_torch", "train, compiled"),
        ("compile_eval_bnorm_over_torch", "eval, compiled"),
        ("rss_bnorm_over_torch", "peak RSS"),
    ]
    cols = [(k, t) for k, t in cols if any(k in r for r in rows)]
    lines = [
        "| model | input | " + " | ".join(t for _, t in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k, _ in cols]
        lines.append(f"| {r['model']} | {r['input']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    _rss_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
