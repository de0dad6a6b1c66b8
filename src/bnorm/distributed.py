r"""Batch statistics merged over torch.distributed, and helpers for data-parallel training.

Two parts:

1. **The math and the collectives of** :class:`bnorm.SyncBatchNorm` (pure functions).
   Each rank computes the statistics of its own slice of the global batch, per channel
   ``c``: the count :math:`n_r`, the mean :math:`\mu_r` and the sum of squared deviations
   :math:`M2_r = n_r \sigma_r^2`. One ``all_gather`` of a packed float64 tensor
   ``[n_r, layer id, call, needs_grad, \mu_r (C), M2_r (C)]`` gives every rank everyone's,
   and the exact merge (Chan, Golub & LeVeque's parallel formula, applied to all ranks at
   once) is

   .. math::

       n = \sum_r n_r, \qquad \mu = \frac{1}{n} \sum_r n_r \mu_r, \qquad
       M2 = \sum_r \Big( M2_r + n_r (\mu_r - \mu)^2 \Big), \qquad \sigma^2 = M2 / n

   computed in float64 (no cancellation: it sums squares of deviations, never ``E[x²] - E[x]²``).
   The backward needs two per-channel sums over the global batch, ``Σ dy`` and
   ``Σ dy (x - μ)``; they are additive over ranks, so one ``all_reduce`` of a packed
   ``[Σ dy (C), Σ dy (x-μ) (C), id, id², call, call²]`` gives them.

   The **tag** ``(layer id, call)`` says which layer is calling and for the how-many-th time.
   Collectives pair by order, so when a rank skips a layer (pytorch issue 44957: a layer
   used on some ranks only) its next collective pairs with another layer's on the other
   ranks: their tags differ and every rank raises :class:`SyncBatchNormError` instead of
   silently mixing statistics of different layers or hanging. In the backward, the sums of
   ``t`` and ``t²`` over ``k`` ranks equal ``k·t`` and ``k·t²`` only when all tags equal ``t``
   (Cauchy–Schwarz), so one all_reduce still detects a mismatch. A rank that stops calling
   altogether (dead, or stuck) is caught by the timeout.

2. **Helpers for running a training loop under torchrun** (``torchrun --nproc-per-node N``):
   :func:`init_from_env`, :func:`prepare_model`, :func:`shard`, :func:`is_main_process`,
   :func:`rank`, :func:`world_size`, :func:`global_mean_loss_scale`. A loop written with them
   runs unchanged in a single process (every helper is then the identity or trivial).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import SyncBatchNormError

__all__ = [
    "MergedStatistics",
    "SyncBatchNormError",
    "all_reduce_grad_sums",
    "gather_statistics",
    "global_mean_loss_scale",
    "init_from_env",
    "is_main_process",
    "merge_statistics",
    "prepare_model",
    "process_group_from_env",
    "rank",
    "shard",
    "shard_bounds",
    "sync_group",
    "unwrap",
    "world_size",
]

_HEADER = 4  # count, layer id, call, needs_grad
_CALL_MOD = 1 << 20  # calls enter the backward check modulo this, so call² stays exact


@dataclass(frozen=True)
class MergedStatistics:
    """The global statistics of one synchronized call (float64, shape (C,) for mean and var).

    ``count`` is the global number of values per channel; ``var`` is biased (``M2 / count``).
    ``needs_grad`` is True when any rank's output takes part in autograd (then every rank runs
    the backward collective, see :class:`bnorm.SyncBatchNorm`).
    """

    mean: Tensor
    var: Tensor
    count: int
    needs_grad: bool


def merge_statistics(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, int]:
    r"""Exact merge of per-rank statistics: ``(mean, biased var, count)`` of the union.

    Args:
        counts: (k,) values per channel on each rank (0 for an empty rank).
        means: (k, C) per-rank means (any value, even NaN, for an empty rank: weight 0).
        m2s: (k, C) per-rank sums of squared deviations from the rank's own mean (likewise).

    Returns float64 ``mean`` and ``var`` of shape (C,) and the total count; for a total
    count of 0, mean 0 and var 1 (finite stand-ins: nothing is normalized).
    """
    counts = counts.to(torch.float64)
    means = means.to(torch.float64)
    m2s = m2s.to(torch.float64)
    total = float(counts.sum())
    channels = means.shape[1]
    if total == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=means.device)
        return zeros, zeros + 1.0, 0
    w = counts.unsqueeze(1)
    # Empty ranks may carry any placeholder mean; weight 0 times it must not make NaN from Inf.
    means = torch.where(w > 0, means, torch.zeros_like(means))
    m2s = torch.where(w > 0, m2s, torch.zeros_like(m2s))
    mean = (w * means).sum(0) / total
    m2 = (m2s + w * (means - mean) ** 2).sum(0)
    return mean, m2 / total, int(total)


def _fail(
    layer: str, tag: tuple[int, int], what: str, err: BaseException | None = None
) -> SyncBatchNormError:
    me = dist.get_rank() if dist.is_initialized() else 0
    text = f"{layer} (sync_id {tag[0]}): rank {me}, call {tag[1]}: {what}"
    if err is not None:
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        text += f" ({type(err).__name__}: {first_line})"
    return SyncBatchNormError(text)


def _wait(work: dist.Work | None, timeout: datetime.timedelta | None) -> None:
    if work is None:
        return
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


def gather_statistics(
    mean: Tensor,
    var: Tensor,
    count: int,
    *,
    needs_grad: bool,
    tag: tuple[int, int],
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta | None,
    layer: str,
) -> MergedStatistics:
    """All-gather this rank's ``(count, mean, M2)`` and merge everyone's (one collective).

    ``mean``/``var`` are this rank's float64 (C,) statistics (ignored when ``count`` is 0).
    ``tag`` is ``(layer id, call counter)``; ranks whose tags differ raise
    :class:`SyncBatchNormError`, as do ranks disagreeing on ``needs_grad`` (a backward on
    some ranks only would hang the others). ``timeout`` bounds the wait (``None``: the process
    group's own timeout).
    """
    channels = mean.shape[0]
    packed = torch.empty(_HEADER + 2 * channels, dtype=torch.float64, device=mean.device)
    packed[0] = count
    packed[1] = tag[0]
    packed[2] = tag[1]
    packed[3] = float(needs_grad)
    if count > 0:
        packed[_HEADER : _HEADER + channels] = mean
        packed[_HEADER + channels :] = var * count
    else:
        packed[_HEADER:] = 0.0
    k = dist.get_world_size(group)
    parts = [torch.empty_like(packed) for _ in range(k)]
    try:
        _wait(dist.all_gather(parts, packed, group=group, async_op=True), timeout)
    except Exception as err:  # gloo raises RuntimeError/DistBackendError subclasses
        raise _fail(
            layer,
            tag,
            f"gathering batch statistics from {k} ranks failed: another rank died, did not "
            "call this layer (or called a layer of another size), or did not reach it within "
            "the timeout",
            err,
        ) from err
    table = torch.stack(parts)
    tags = table[:, 1:3].cpu()
    if bool((tags != torch.tensor(tag, dtype=torch.float64)).any()):
        seen = [(int(a), int(b)) for a, b in tags.tolist()]
        raise _fail(
            layer,
            tag,
            f"ranks are out of step: the (sync_id, call) pairs that met in this collective are "
            f"{seen}, one per rank (a rank skipped or repeated a SyncBatchNorm call); "
            "no running statistics were updated",
        )
    flags = table[:, 3]
    if bool((flags != flags[0]).any()):
        raise _fail(
            layer,
            tag,
            "some ranks need a backward through this layer and others do not "
            f"(requires_grad per rank: {[bool(f) for f in flags]}); the backward collective "
            "would hang. Give every rank the same grad mode and requires_grad inputs",
        )
    mean_g, var_g, count_g = merge_statistics(
        table[:, 0], table[:, _HEADER : _HEADER + channels], table[:, _HEADER + channels :]
    )
    return MergedStatistics(mean_g, var_g, count_g, bool(flags[0]))


def all_reduce_grad_sums(
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    *,
    tag: tuple[int, int],
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta | None,
    layer: str,
) -> tuple[Tensor, Tensor]:
    """Sum the backward's per-channel reductions over ranks (one ``all_reduce``).

    ``sum_dy`` and ``sum_dy_xmu`` are this rank's float64 (C,) sums (zeros for an empty
    rank); returns the global sums. The tag check is described in the module docstring.
    """
    channels = sum_dy.shape[0]
    packed = torch.empty(2 * channels + 4, dtype=torch.float64, device=sum_dy.device)
    packed[:channels] = sum_dy
    packed[channels : 2 * channels] = sum_dy_xmu
    ident = (float(tag[0]), float(tag[1] % _CALL_MOD))
    check = torch.tensor([ident[0], ident[0] ** 2, ident[1], ident[1] ** 2], dtype=torch.float64)
    packed[-4:] = check
    k = dist.get_world_size(group)
    try:
        _wait(dist.all_reduce(packed, group=group, async_op=True), timeout)
    except Exception as err:
        raise _fail(
            layer,
            tag,
            f"summing gradient statistics over {k} ranks failed in the backward: another rank "
            "died, or did not run the backward through this layer within the timeout (every "
            "rank must call backward on a loss that depends on the layer's output)",
            err,
        ) from err
    if not torch.equal(packed[-4:].cpu(), check * k):
        raise _fail(
            layer,
            tag,
            "ranks are out of step in the backward: their (sync_id, call) tags differ "
            "(the backward passes of different layers or steps met)",
        )
    return packed[:channels], packed[channels : 2 * channels]


def sync_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | bool | None:
    """The group to synchronize over, or ``False`` when there is nothing to synchronize.

    ``False`` when torch.distributed is unavailable or not initialized, when this rank is not a
    member of ``group``, or when the group has one process (the cases where
    :class:`bnorm.SyncBatchNorm` computes local batch norm, as torch's does).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if group is not None and group == dist.GroupMember.NON_GROUP_MEMBER:
        return False
    if dist.get_world_size(group) <= 1:
        return False
    return group


# --------------------------------------------------------------------------------------------
# Data-parallel training under torchrun
# --------------------------------------------------------------------------------------------


def init_from_env(backend: str = "gloo", timeout: datetime.timedelta | float | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False if not under it.

    Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` set and > 1) this calls
    :func:`torch.distributed.init_process_group` with ``backend`` (``"gloo"``: CPU; use
    ``"nccl"`` for CUDA tensors) and ``timeout`` (seconds or a timedelta; it also bounds every
    :class:`bnorm.SyncBatchNorm` collective whose layer has no timeout of its own), and returns
    True. Without torchrun, or with one process, it does nothing and returns False, so the
    same script runs single-process. Calling it again once initialized returns True.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if isinstance(timeout, int | float):
        timeout = datetime.timedelta(seconds=timeout)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, **kwargs)
    return True


@contextlib.contextmanager
def process_group_from_env(
    backend: str = "gloo", timeout: datetime.timedelta | float | None = None
) -> Iterator[bool]:
    """:func:`init_from_env` for the length of a ``with`` block, which gets whether it runs
    distributed. A group this call made is left on the way out
    (:func:`torch.distributed.destroy_process_group`), after every rank has reached the end of
    the block when it ended normally: a gloo group still alive when the interpreter exits can
    abort the process ("terminate called without an active exception", seen once in CI on a
    rank that had nothing left to do). A group that existed before is left as it was."""
    existed = dist.is_available() and dist.is_initialized()
    distributed = init_from_env(backend, timeout)
    made = distributed and not existed
    try:
        yield distributed
        if made:
            dist.barrier()
    finally:
        if made:
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that prints and writes."""
    return rank() == 0


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split into ``parts`` contiguous,
    near-equal parts (the first ``n % parts`` parts get one more). Parts may be empty."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice (along dim 0) of a global batch that every rank holds.

    Every rank draws the same global batch (same seed, same order) and keeps its slice, so the
    union over ranks is the global batch and SyncBatchNorm sees exactly its statistics. Sizes
    differ by at most one; a slice may be empty when the batch is smaller than the world.
    Not distributed: the batch itself.
    """
    start, stop = shard_bounds(batch.shape[0], world_size(), rank())
    return batch[start:stop]


def global_mean_loss_scale(local_size: int, global_size: int) -> float:
    """The factor turning a *sum* of per-sample losses on this rank into its share of the
    global-batch mean, after DDP's gradient averaging.

    DDP averages gradients over ``world_size`` ranks, so ``loss_sum * world_size /
    global_size`` on each rank gives exactly the gradient of the mean loss over the global
    batch, even when shards have different sizes (a plain per-rank mean would weight the
    samples of a smaller shard more). ``local_size`` is accepted for clarity and checked.
    """
    if not 0 <= local_size <= global_size:
        raise ValueError(f"local_size must be in [0, {global_size}], got {local_size}")
    return world_size() / global_size


def prepare_model(
    model: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    *,
    timeout: datetime.timedelta | float | None = None,
    **ddp_kwargs: object,
) -> nn.Module:
    """Make ``model`` data-parallel: SyncBatchNorm layers, then DistributedDataParallel.

    Every torch or bnorm BatchNorm layer is converted by :func:`bnorm.convert_sync_batchnorm`
    (state kept; ``timeout`` is given to each layer), and the model is wrapped in
    :class:`torch.nn.parallel.DistributedDataParallel` (CPU: no ``device_ids``).
    Buffer syncing on every forward (``forward_sync_buffers``, formerly ``broadcast_buffers``)
    is off by default because SyncBatchNorm keeps the running statistics equal on every rank
    already (syncing them would add a collective per forward);
    ``ddp_kwargs`` override it and pass anything else to DDP. Not distributed: the model is
    returned unchanged (local batch norm, no wrapper), so a loop runs single-process as is.
    Use ``model.module`` (see :func:`unwrap`) to evaluate or save without collectives.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    from .modules.sync import convert_sync_batchnorm

    model = convert_sync_batchnorm(model, process_group, timeout=timeout)
    if "broadcast_buffers" not in ddp_kwargs:
        # torch 2.13 renamed the flag (the old name warns); older versions only know the old.
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        flag = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        ddp_kwargs.setdefault(flag, False)
    if process_group is not None:
        ddp_kwargs.setdefault("process_group", process_group)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)  # type: ignore[arg-type]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
