"""Small helpers shared by bnorm's remedy layers (private)."""

from __future__ import annotations

import torch
from torch import Tensor


def layout_of(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is contiguous in (channels_last stays channels_last)."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def as_supported_layout(x: Tensor) -> Tensor:
    """``x`` itself if contiguous or channels_last(_3d), else a contiguous copy (as torch does)."""
    if layout_of(x) is torch.contiguous_format and not x.is_contiguous():
        return x.contiguous()
    return x


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) tensor shaped to broadcast over the channels (dim 1) of ``x``."""
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim of ``x`` but the channel dim 1."""
    return [0, *range(2, x.dim())]


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0
