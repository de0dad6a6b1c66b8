r"""Recurrent batch normalization (Cooijmans et al. 2016): batch norm inside an LSTM.

The statistics of a recurrent layer's pre-activations change with the time step (the first
steps start from a fixed initial state), so each step ``t`` keeps its own running statistics;
γ and β are shared across steps. :class:`BNLSTMCell` and :class:`BNLSTM` normalize the
input-to-hidden and hidden-to-hidden terms separately, and the cell before its output:

.. math::

    (i, f, g, o) = BN(W_{ih} x_t;\ \gamma_x, t) + BN(W_{hh} h_{t-1};\ \gamma_h, t) + b, \qquad
    c_t = \sigma(f)\odot c_{t-1} + \sigma(i)\odot\tanh(g), \qquad
    h_t = \sigma(o)\odot\tanh(BN(c_t;\ \gamma_c, \beta_c, t)).

The two gate BNs have no β (the bias ``b`` plays that role). γ starts at 0.1, not 1: with unit
variance, tanh and the sigmoids would saturate and the gradients vanish (the paper's finding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _checks
from ..functional import batch_norm_unchecked

__all__ = ["BNLSTM", "BNLSTMCell", "RecurrentBatchNorm1d"]


class RecurrentBatchNorm1d(nn.Module):
    r"""Batch norm with separate running statistics per time step, called as ``bn(x, t)``.

    .. math::  y = \gamma\,\frac{x - \mu_t}{\sqrt{\sigma_t^2 + \epsilon}} + \beta

    Training normalizes with the batch's statistics (biased variance) and moves the running
    statistics of step ``s = min(t, max_steps - 1)`` (``momentum`` is PyTorch's update rate,
    ``None`` the cumulative average per step; the running variance is unbiased). Evaluation
    uses step ``s``'s running statistics: steps beyond ``max_steps - 1`` share the last one's.

    Shape: input (N, C), ``t`` a non-negative int; output (N, C).

    State (``state_dict``): ``weight`` (C,) init ``gamma_init`` = 0.1 and ``bias`` (C,) init 0,
    shared across steps (if ``affine``; ``bias=False`` drops β); ``running_mean`` (max_steps, C)
    init 0, ``running_var`` (max_steps, C) init 1, and ``num_batches_tracked`` (max_steps,),
    the number of training batches each step has seen. Same key names as ``BatchNorm1d``, with
    a leading time dimension on the buffers.

    Args:
        num_features: ``C``.
        max_steps: the number of steps with their own statistics (>= 1).
        eps, momentum, affine: as :class:`bnorm.BatchNorm1d`.
        bias: with ``affine``, whether to learn β (keyword only).
        gamma_init: the initial γ (keyword only; 0.1 as in the paper, 1.0 for the ablation).
        small_batch: ``"error"`` (default) or ``"running"``: a training step with a single
            sample normalizes with step ``s``'s running statistics and does not update them.
        on_nonfinite: ``"warn"`` or ``"raise"`` for a training batch holding NaN/Inf (the
            running statistics stay as they were either way).
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        bias: bool = True,
        gamma_init: float = 0.1,
        small_batch: str = "error",
        on_nonfinite: str = "warn",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = f"{type(self).__name__}({num_features})"
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"{name}: max_steps must be a positive int, got {max_steps!r}")
        _checks.check_eps(name, eps)
        self.num_features = num_features
        self.max_steps = max_steps
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.gamma_init = float(gamma_init)
        self.small_batch = _checks.check_small_batch_policy(name, small_batch)
        self.on_nonfinite = _checks.check_nonfinite_policy(name, on_nonfinite)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **kw)) if affine and bias else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features, **kw))
        self.register_buffer("running_var", torch.ones(max_steps, num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.zeros(max_steps, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def step_index(self, t: int | Tensor) -> int:
        """The row of the running statistics that step ``t`` uses: ``min(t, max_steps - 1)``."""
        step = int(t)
        if step < 0 or (isinstance(t, float) and not float(t).is_integer()):
            raise ValueError(
                f"{self._layer_name()}: the time step t must be an int >= 0, got {t!r}"
            )
        return min(step, self.max_steps - 1)

    def forward(self, input: Tensor, t: int | Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._op_forward(input, t)
        name = self._layer_name()
        _checks.check_tensor(name, input)
        _checks.check_rank(name, input, (2,), "(N, C)")
        _checks.check_channels(name, input, self.num_features)
        s = self.step_index(t)
        _checks.check_per_channel(
            name,
            input,
            {
                "weight": self.weight,
                "bias": self.bias,
                f"running_mean[{s}]": self.running_mean[s],
                f"running_var[{s}]": self.running_var[s],
            },
        )
        fallback = self.training and self.small_batch == "running" and input.shape[0] == 1
        use_batch_stats = self.training and not fallback
        if use_batch_stats:
            _checks.check_batch_size(name, input)
        # Training passes views, so the update lands in row s of the buffers. Otherwise the
        # autograd graph keeps the statistics it normalized with: copies, so a later update
        # of row s (another forward before this backward) does not invalidate that graph.
        mean, var = self.running_mean[s], self.running_var[s]
        if not use_batch_stats:
            mean, var = mean.clone(), var.clone()
        return batch_norm_unchecked(
            input,
            mean,
            var,
            self.weight,
            self.bias,
            use_batch_stats=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked[s] if use_batch_stats else None,
            on_nonfinite=self.on_nonfinite,
            layer=name,
        )

    def _op_forward(self, input: Tensor, t: int | Tensor) -> Tensor:
        """The layer as the one operator ``torch.ops.bnorm.batch_norm`` on row ``s`` of the
        buffers (TorchScript): :meth:`forward`'s rule without its Python checks."""
        step = t if isinstance(t, int) else int(t.item())
        if step < 0:
            raise ValueError("RecurrentBatchNorm1d: the time step t must be an int >= 0")
        s = min(step, self.max_steps - 1)
        fallback = self.training and self.small_batch == "running" and input.size(0) == 1
        if self.training and not fallback:  # views: the update lands in row s
            return torch.ops.bnorm.batch_norm(
                input, self.weight, self.bias, self.running_mean[s], self.running_var[s],
                self.num_batches_tracked[s], True, self.momentum, self.eps,
            )  # fmt: skip
        return torch.ops.bnorm.batch_norm(
            input, self.weight, self.bias, self.running_mean[s].clone(),
            self.running_var[s].clone(), None, False, self.momentum, self.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, gamma_init={self.gamma_init}"
        )
        if self.affine and self.bias is None:
            text += ", bias=False"
        if self.small_batch != "error":
            text += f", small_batch={self.small_batch!r}"
        return text


class BNLSTMCell(nn.Module):
    r"""One step of the batch-normalized LSTM (see :mod:`bnorm.modules.recurrent`).

    ``cell(x, (h, c), t) -> (h', c')`` with x (B, input_size), h and c (B, hidden_size)
    (zeros if ``hx`` is None). Gates are ordered (i, f, g, o) as in ``torch.nn.LSTMCell``.

    Parameters: ``weight_ih`` (4H, I), uniform in ±1/sqrt(H) as torch's LSTM; ``weight_hh``
    (4H, H), orthogonal per gate (the paper's initialization); ``bias`` (4H,), zero but 1 for
    the forget gate. Batch norms: ``bn_ih``, ``bn_hh`` (4H features, γ only) and ``bn_c``
    (H features, γ and β), each a :class:`RecurrentBatchNorm1d` with ``max_steps`` steps.

    Args:
        input_size, hidden_size, max_steps: sizes, and the steps with their own statistics.
        bias: learn the gate bias ``b``.
        gamma_init: initial γ of the three batch norms (0.1; 1.0 is the paper's ablation).
        eps, momentum: of the batch norms.
        small_batch: of the batch norms (a step where a single sequence is still running).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        bias: bool = True,
        *,
        gamma_init: float = 0.1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        small_batch: str = "running",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **kw))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size, **kw)) if bias else None
        bn = {
            "eps": eps,
            "momentum": momentum,
            "gamma_init": gamma_init,
            "small_batch": small_batch,
        }
        self.bn_ih = RecurrentBatchNorm1d(4 * hidden_size, max_steps, bias=False, **bn, **kw)
        self.bn_hh = RecurrentBatchNorm1d(4 * hidden_size, max_steps, bias=False, **bn, **kw)
        self.bn_c = RecurrentBatchNorm1d(hidden_size, max_steps, **bn, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        with torch.no_grad():
            for block in self.weight_hh.split(self.hidden_size, dim=0):
                nn.init.orthogonal_(block)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
            with torch.no_grad():  # forget gate bias 1: remember by default at the start
                self.bias[self.hidden_size : 2 * self.hidden_size].fill_(1.0)
        for m in (self.bn_ih, self.bn_hh, self.bn_c):
            m.reset_parameters()

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, t: int = 0
    ) -> tuple[Tensor, Tensor]:
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        h, c = hx
        gates = self.bn_ih(input @ self.weight_ih.T, t) + self.bn_hh(h @ self.weight_hh.T, t)
        if self.bias is not None:
            gates = gates + self.bias
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(self.bn_c(c_new, t))
        return h_new, c_new

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}"


class BNLSTM(nn.Module):
    r"""A single-layer, unidirectional batch-normalized LSTM over whole sequences.

    ``lstm(input, hx=None, lengths=None) -> (output, (h_n, c_n))`` like ``torch.nn.LSTM``
    with ``num_layers=1``: ``input`` is (T, B, I) (or (B, T, I) with ``batch_first``) or a
    ``PackedSequence``; ``hx`` is ``(h_0, c_0)``, each (1, B, H), zeros if None; ``output`` is
    (T, B, H) (resp. (B, T, H)), zero beyond each sequence's length, or a ``PackedSequence``
    for a packed input; ``h_n, c_n`` (1, B, H) are each sequence's state at its last valid step.

    Variable lengths: pass ``lengths`` (B,) with a padded input, or a packed input. At step t
    only the sequences still running are fed to the cell, so every batch norm takes its
    statistics over the valid steps only and padding never enters them; finished sequences
    keep their state. A step where a single sequence is still running is normalized with that
    step's running statistics (``small_batch="running"``, the default here; ``"error"`` raises).

    Args:
        input_size, hidden_size: as ``torch.nn.LSTM``.
        max_steps: steps with their own batch-norm statistics (later steps share the last).
        batch_first, bias: as ``torch.nn.LSTM``.
        gamma_init, eps, momentum, small_batch: of the batch norms (see :class:`BNLSTMCell`).

    Parameters and buffers are the cell's, under ``cell.``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        batch_first: bool = False,
        bias: bool = True,
        *,
        gamma_init: float = 0.1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        small_batch: str = "running",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.batch_first = batch_first
        self.cell = BNLSTMCell(
            input_size,
            hidden_size,
            max_steps,
            bias,
            gamma_init=gamma_init,
            eps=eps,
            momentum=momentum,
            small_batch=small_batch,
            device=device,
            dtype=dtype,
        )

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():
            if isinstance(input, Tensor):
                return self._script_padded(input, hx, lengths)
            # (a PackedSequence made in scripted code; from Python, TorchScript's argument
            # conversion cannot match a PackedSequence to this union)
            return self._script_packed(input, hx)
        if isinstance(input, torch.fx.Proxy):
            # Symbolic tracing: one call of this module in the graph, as FX records torch's
            # own nn.LSTM (a leaf module); the graph runs this forward on real tensors.
            tracer = input.tracer
            path = tracer.path_of_module(self)
            if not path:
                raise TypeError(
                    f"{type(self).__name__}({self.input_size}, {self.hidden_size}): symbolic "
                    "tracing records this layer as one call inside the model that holds it; "
                    "trace that model (FX cannot record the traced root as a call)"
                )
            return tracer.create_proxy("call_module", path, (input, hx, lengths), {})
        name = f"{type(self).__name__}({self.input_size}, {self.hidden_size})"
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError(f"{name}: pass lengths or a PackedSequence, not both")
            x, lens = pad_packed_sequence(input)  # (T, B, I), original batch order
        else:
            _checks.check_tensor(name, input)
            _checks.check_rank(name, input, (3,), "(B, T, I)" if self.batch_first else "(T, B, I)")
            x = input.transpose(0, 1) if self.batch_first else input
            lens = None if lengths is None else self._lengths(name, x, lengths)
        if x.shape[2] != self.input_size:
            raise ValueError(f"{name}: expected input size {self.input_size}, got {x.shape[2]}")
        h, c = self._initial_state(name, x, hx)
        out, state = self._steps(x, h, c, lens)
        if packed:
            return self._pack_like(input, out, lens), state
        return (out.transpose(0, 1) if self.batch_first else out), state

    def _pack_like(self, input: PackedSequence, out: Tensor, lens: Tensor) -> PackedSequence:
        """The output (T, B, H) packed as the input was: the same batch_sizes and sorting, as
        torch's LSTM returns it."""
        idx = input.sorted_indices
        if idx is None:
            data = pack_padded_sequence(out, lens, enforce_sorted=True).data
        else:
            data = pack_padded_sequence(out[:, idx], lens[idx], enforce_sorted=True).data
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)

    # The two scripted entries return the union forward declares: a saved module's code is
    # type-checked again when loaded, and two branches returning two types would not load.
    def _script_padded(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None, lengths: Tensor | list[int] | None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        x = input.transpose(0, 1) if self.batch_first else input
        out, state = self._script_steps(x, hx, lengths)
        return (out.transpose(0, 1) if self.batch_first else out), state

    def _script_packed(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        x, lens = pad_packed_sequence(input)  # (T, B, I), whatever batch_first says
        out, state = self._script_steps(x, hx, lens)
        return self._pack_like(input, out, lens), state

    def _script_steps(
        self,
        x: Tensor,
        hx: tuple[Tensor, Tensor] | None,
        lengths: Tensor | list[int] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`forward` for TorchScript on a padded x (T, B, I): the same steps, with the
        checks of the padded tensor's shape that :mod:`bnorm._checks` makes in eager calls."""
        name = f"BNLSTM({self.input_size}, {self.hidden_size})"
        if x.dim() != 3 or x.size(2) != self.input_size:
            raise ValueError(f"{name}: expected a 3D input of input size {self.input_size}")
        h, c = self._initial_state(name, x, hx)
        lens = None if lengths is None else self._lengths(name, x, lengths)
        return self._steps(x, h, c, lens)

    def _steps(
        self, x: Tensor, h: Tensor, c: Tensor, lens: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The recurrence over x (T, B, I) from the state (h, c) (B, H): the output (T, B, H)
        and the final state (1, B, H) each, in x's batch order; ``lens`` (B,) the valid steps
        of each sequence, or None where every sequence runs every step."""
        steps, batch = x.size(0), x.size(1)
        if lens is None:
            # Every sequence runs every step: no reordering and no per-step counts read from
            # the data, so torch.compile and torch.export see a loop of fixed shapes.
            outputs: list[Tensor] = []
            for t in range(steps):
                h, c = self.cell(x[t], (h, c), t)
                outputs.append(h)
            out = torch.stack(outputs) if steps > 0 else x.new_zeros(0, batch, self.hidden_size)
            return out, (h.unsqueeze(0), c.unsqueeze(0))
        # Longest sequences first: the sequences running at step t are then the first b_t rows.
        order = torch.argsort(lens, descending=True, stable=True)
        inverse = torch.argsort(order)
        x, h, c = x[:, order], h[order], c[order]
        running: list[int] = (lens[order] > torch.arange(steps).unsqueeze(1)).sum(1).tolist()
        outputs = []
        for t in range(steps):
            b = running[t]
            if b == 0:
                outputs.append(x.new_zeros(batch, self.hidden_size))
                continue
            h_t, c_t = self.cell(x[t, :b], (h[:b], c[:b]), t)
            h = torch.cat([h_t, h[b:]])
            c = torch.cat([c_t, c[b:]])
            outputs.append(torch.cat([h_t, h_t.new_zeros(batch - b, self.hidden_size)]))
        out = torch.stack(outputs)[:, inverse]  # (T, B, H), the input's batch order
        return out, (h[inverse].unsqueeze(0), c[inverse].unsqueeze(0))

    def _lengths(self, name: str, x: Tensor, lengths: Tensor | list[int]) -> Tensor:
        """The valid steps of each sequence (B,), int64 on the CPU, checked against x (T, B, I).
        (Eager and TorchScript calls.)"""
        steps, batch = x.size(0), x.size(1)
        if isinstance(lengths, Tensor):
            lens = lengths.to(torch.long).cpu()
        else:
            lens = torch.tensor(lengths, dtype=torch.long)
        if lens.dim() != 1 or lens.size(0) != batch:
            raise ValueError(
                f"{name}: expected {batch} lengths, got shape {_shape_text(list(lens.shape))}"
            )
        if batch > 0 and (int(lens.min()) < 1 or int(lens.max()) > steps):
            got: list[int] = lens.tolist()
            raise ValueError(
                f"{name}: lengths must lie in [1, {steps}] (the padded length), got {got}"
            )
        return lens

    def _initial_state(
        self, name: str, x: Tensor, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) as (B, H) each: zeros, or ``hx`` checked to be (1, B, H) each. (Eager and
        TorchScript calls.)"""
        batch = x.size(1)
        if hx is None:
            zeros = x.new_zeros(batch, self.hidden_size)
            return zeros, zeros
        h0, c0 = hx
        expected = [1, batch, self.hidden_size]
        for which, v in (("h_0", h0), ("c_0", c0)):
            if list(v.shape) != expected:
                raise ValueError(
                    f"{name}: expected {which} of shape {_shape_text(expected)}, "
                    f"got {_shape_text(list(v.shape))}"
                )
        return h0[0], c0[0]

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}, "
            f"batch_first={self.batch_first}"
        )


def _shape_text(shape: list[int]) -> str:
    """A shape as Python prints a tuple, ``(1, 2, 4)`` or ``(3,)`` (TorchScript has no tuple())."""
    inner = ", ".join([str(d) for d in shape])
    return "(" + inner + ("," if len(shape) == 1 else "") + ")"
