"""Small utilities shared by the tests (importable as `helpers`, see pytest's `pythonpath`)."""

from __future__ import annotations

import numpy as np
import torch

SHAPES = {
    "N,C": (6, 4),
    "N,C,L": (3, 4, 5),
    "N,C,H,W": (2, 3, 4, 5),
    "N,C,D,H,W": (2, 3, 2, 3, 4),
}


def np64(t: torch.Tensor | None) -> np.ndarray | None:
    # a copy: a float64 CPU tensor would otherwise share memory with the array
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    raise ValueError("channels_last needs rank 4 or 5")


def is_channels_last(x: torch.Tensor) -> bool:
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=fmt)


def exact_normalize(x: torch.Tensor, eps: float = 1e-5) -> np.ndarray:
    """Batch-normalize the values of x exactly (float64, two passes), channels on dim 1."""
    a = np64(x)
    axes = tuple(i for i in range(a.ndim) if i != 1)
    mean = a.mean(axis=axes, keepdims=True)
    var = ((a - mean) ** 2).mean(axis=axes, keepdims=True)
    return (a - mean) / np.sqrt(var + eps)


def assert_close(actual, expected, atol: float, rtol: float = 0.0, what: str = "") -> None:
    a = np64(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, dtype=float)
    e = np64(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected, dtype=float)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)
