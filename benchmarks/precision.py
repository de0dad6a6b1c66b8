"""Precision of batch normalization far from zero: bnorm vs torch on the same fp32 inputs.

For each offset (the per-channel mean in units of the standard deviation) the input is drawn in
float64, rounded to fp32, and normalized exactly in float64; the table shows the largest absolute
error of each implementation's fp32 output against that exact normalization of the same fp32
values. Run: python benchmarks/precision.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import bnorm


def exact(x: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.double()
    dims = [0, *range(2, x.dim())]
    mean = d.mean(dims, keepdim=True)
    var = (d - mean).pow(2).mean(dims, keepdim=True)
    return (d - mean) / torch.sqrt(var + eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = [(256, 64), (16, 4096), (64, 32, 16, 16), (4, 512, 4, 4), (8, 16, 32, 32, 4)]
    print(f"torch {torch.__version__}; max |y - exact| over the whole output")
    print("| shape | mean / std | torch | bnorm |\n|---|---|---|---|")
    for shape in shapes:
        for offset in (1e3, 1e4, 1e5):
            g = torch.Generator().manual_seed(args.seed)
            x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).float()
            ref = exact(x, 1e-5)
            err_t = (F.batch_norm(x, None, None, training=True).double() - ref).abs().max().item()
            err_b = bnorm.functional.batch_norm(x, None, None, training=True).double() - ref
            print(f"| {shape} | {offset:.0e} | {err_t:.1e} | {err_b.abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
