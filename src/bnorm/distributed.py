r"""Batch statistics merged over torch.distributed, and helpers for data-parallel training.

Two parts:

1. **The math and the collectives of** :class:`bnorm.SyncBatchNorm` (pure functions).
   Each rank computes the statistics of its own slice of the global batch, per channel
   ``c``: the count :math:`n_r`, the mean :math:`\mu_r` and the sum of squared deviations
   :math:`M2_r = n_r \sigma_r^2`. One ``all_gather`` of a packed float64 tensor
   ``[n_r, \mu_r (C), M2_r (C)]`` gives every rank everyone's, and the exact merge (Chan,
   Golub & LeVeque's parallel formula, applied to all ranks at once) is

   .. math::

       n = \sum_r n_r, \qquad \mu = \frac{1}{n} \sum_r n_r \mu_r, \qquad
       M2 = \sum_r \Big( M2_r + n_r (\mu_r - \mu)^2 \Big), \qquad \sigma^2 = M2 / n

   computed in float64 (no cancellation: it sums squares of deviations, never ``E[x²] - E[x]²``).
   The backward needs two per-channel sums over the global batch, ``Σ dy`` and
   ``Σ dy (x - μ)``; they are additive over ranks, so one ``all_reduce`` of a packed
   ``[Σ dy (C), Σ dy (x-μ) (C)]`` gives them.

   **Every rank at the same call.** Collectives pair by order, and these two have sizes that
   depend on the layer (``C``). Before each, one ``all_gather`` of a fixed-size int64 header
   ``[pass, layer id, call, C, dtype, needs_grad]`` checks that every rank is at the same
   layer (``sync_id``), the same call of it, in the same pass, with the same width and dtype.
   When a rank skips a layer (pytorch issue 44957: a layer used on some ranks only), calls an
   extra one or runs another model, the headers differ and **every** rank raises
   :class:`SyncBatchNormError` (all ranks see the same table, so all decide alike), instead
   of pairing collectives of different sizes (gloo then aborts the process: ``EnforceNotMet``)
   or silently mixing statistics of different layers. A rank that stops calling altogether
   (dead, or stuck) is caught by the timeout.

   **Timeouts and recovery.** Each collective runs with the layer's ``timeout`` as its own
   (the backend's per-operation timeout): when it expires, the backend fails the operation,
   so nothing of this layer stays posted on the group. After a
   :class:`SyncBatchNormError`, ``torch.distributed.destroy_process_group()`` therefore returns
   at once and the process exits without waiting for the missing peer (with only a wait
   bounded by ``Work.wait(timeout)``, the operation stayed queued until the group's own
   timeout, 30 minutes by default for gloo, and both waited for it).

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


def _process_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    pg = dist.group.WORLD if group is None else group
    assert pg is not None, "torch.distributed is not initialized"
    return pg


def _all_gather(
    tensor: Tensor, group: dist.ProcessGroup | None, timeout: datetime.timedelta | None
) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), the collective bounded by ``timeout``.

    The timeout is the collective's own (the backend's per-operation timeout), not a bound on
    waiting for it: when it expires the backend fails the operation and no part of it stays
    posted on the group. (``Work.wait(timeout)`` would only stop waiting; the operation would
    stay queued in the backend until the group's own timeout, and
    ``destroy_process_group()`` and the process's exit would wait for it.)
    """
    pg = _process_group(group)
    parts = [torch.empty_like(tensor) for _ in range(pg.size())]
    opts = dist.distributed_c10d.AllgatherOptions()
    if timeout is not None:
        opts.timeout = timeout
    pg.allgather([parts], [tensor], opts).wait()
    return parts


def _all_reduce_sum(
    tensor: Tensor, group: dist.ProcessGroup | None, timeout: datetime.timedelta | None
) -> None:
    """In-place sum of ``tensor`` over ranks, bounded by ``timeout`` as :func:`_all_gather`."""
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    if timeout is not None:
        opts.timeout = timeout
    _process_group(group).allreduce([tensor], opts).wait()


_FORWARD, _BACKWARD = 1, 2
_PASS_NAMES = {_FORWARD: "forward", _BACKWARD: "backward"}
# Input dtypes by a stable code (the header is int64); other dtypes share one code.
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CODE_DTYPES = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_CODES.items()}


def _check_in_step(
    step: int,
    tag: tuple[int, int],
    width: int,
    dtype: torch.dtype | None,
    needs_grad: bool,
    *,
    device: torch.device,
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta | None,
    layer: str,
) -> None:
    """Make sure every rank is at the same call before a collective whose size depends on it.

    One ``all_gather`` of a fixed-size int64 header ``[pass, sync_id, call, width, dtype,
    needs_grad]``: its size never depends on the layer, so it pairs safely whatever each rank
    is doing, and every rank gets the same table, so every rank takes the same decision. A
    rank that skipped or repeated a call, or called another layer, then makes every rank raise
    :class:`SyncBatchNormError` here, instead of pairing collectives of different sizes (gloo
    aborts the process on those) or mixing statistics of different layers.
    """
    code = _DTYPE_CODES.get(dtype, 0) if dtype is not None else -1
    header = torch.tensor(
        [step, tag[0], tag[1], width, code, int(needs_grad)], dtype=torch.int64, device=device
    )
    k = dist.get_world_size(group)
    try:
        rows = _all_gather(header, group, timeout)
    except Exception as err:  # gloo raises RuntimeError/DistBackendError subclasses
        raise _fail(
            layer,
            tag,
            f"meeting the other ranks in the {_PASS_NAMES[step]} failed ({k} ranks): another "
            "rank died, or did not reach a SyncBatchNorm call within the timeout",
            err,
        ) from err
    table = torch.stack(rows).cpu().tolist()
    if all(row == table[0] for row in table):
        return
    if all(row[:5] == table[0][:5] for row in table):
        raise _fail(
            layer,
            tag,
            "some ranks need a backward through this layer and others do not "
            f"(requires_grad per rank: {[bool(row[5]) for row in table]}); the backward "
            "collective would hang. Give every rank the same grad mode and requires_grad inputs",
        )
    seen = [(row[1], row[2]) for row in table]
    passes = [_PASS_NAMES.get(row[0], "?") for row in table]
    widths = [row[3] for row in table]
    dtypes = [_CODE_DTYPES.get(row[4], "other") for row in table]
    raise _fail(
        layer,
        tag,
        f"ranks are out of step: the (sync_id, call) pairs that met in this collective are "
        f"{seen}, one per rank (passes {passes}, channels {widths}, dtypes {dtypes}): a rank "
        "skipped, repeated or added a SyncBatchNorm call; no running statistics were updated",
    )


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
    dtype: torch.dtype | None = None,
) -> MergedStatistics:
    """All-gather this rank's ``(count, mean, M2)`` and merge everyone's.

    ``mean``/``var`` are this rank's float64 (C,) statistics (ignored when ``count`` is 0).
    ``tag`` is ``(layer id, call counter)`` and ``dtype`` the input's dtype: first every rank
    checks that all ranks are at the same call (:func:`_check_in_step`), so ranks whose tags,
    widths or dtypes differ raise :class:`SyncBatchNormError`, as do ranks disagreeing on
    ``needs_grad`` (a backward on some ranks only would hang the others). ``timeout`` is each
    collective's own timeout (``None``: the process group's).
    """
    channels = mean.shape[0]
    _check_in_step(
        _FORWARD,
        tag,
        channels,
        dtype,
        needs_grad,
        device=mean.device,
        group=group,
        timeout=timeout,
        layer=layer,
    )
    packed = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=mean.device)
    packed[0] = count
    if count > 0:
        packed[1 : 1 + channels] = mean
        packed[1 + channels :] = var * count
    k = dist.get_world_size(group)
    try:
        parts = _all_gather(packed, group, timeout)
    except Exception as err:
        raise _fail(
            layer,
            tag,
            f"gathering batch statistics from {k} ranks failed: another rank died or did not "
            "finish the call within the timeout",
            err,
        ) from err
    table = torch.stack(parts)
    mean_g, var_g, count_g = merge_statistics(
        table[:, 0], table[:, 1 : 1 + channels], table[:, 1 + channels :]
    )
    return MergedStatistics(mean_g, var_g, count_g, needs_grad)


def all_reduce_grad_sums(
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    *,
    tag: tuple[int, int],
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta | None,
    layer: str,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum the backward's per-channel reductions over ranks (one ``all_reduce``), after the
    same in-step check as the forward's (:func:`_check_in_step`).

    ``sum_dy`` and ``sum_dy_xmu`` are this rank's float64 (C,) sums (zeros for an empty
    rank); returns the global sums.
    """
    channels = sum_dy.shape[0]
    _check_in_step(
        _BACKWARD,
        tag,
        channels,
        dtype,
        False,
        device=sum_dy.device,
        group=group,
        timeout=timeout,
        layer=layer,
    )
    packed = torch.cat([sum_dy, sum_dy_xmu]).to(torch.float64)
    k = dist.get_world_size(group)
    try:
        _all_reduce_sum(packed, group, timeout)
    except Exception as err:
        raise _fail(
            layer,
            tag,
            f"summing gradient statistics over {k} ranks failed in the backward: another rank "
            "died, or did not run the backward through this layer within the timeout (every "
            "rank must call backward on a loss that depends on the layer's output)",
            err,
        ) from err
    return packed[:channels], packed[channels:]


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
