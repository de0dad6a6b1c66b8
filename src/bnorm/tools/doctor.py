r"""``bnorm.doctor``: measure what is wrong with the batch normalization of a model, and prescribe.

:func:`doctor` runs a few batches through a *copy* of the model, captures every batch-norm
layer's input with forward pre-hooks and accumulates exact per-channel statistics in float64
(the merge of :class:`bnorm.tools.precise.MergedStats`). From them, and from the layers' own
state, it derives findings by rules, each a pure function of the measured numbers with its
thresholds as module constants:

========================  ==================================================================
rule                      symptom
========================  ==================================================================
``eval-mismatch``         running statistics far from the exact statistics of the inputs
``unconverged``           too few updates for the momentum: the initial values still weigh
``untrained``             running statistics still exactly at their initial values
``non-iid``               per-batch means spread more than i.i.d. sampling allows
``small-batch``           batches so small that the batch statistics are noisy
``degenerate``            dead channels (variance ≈ 0), γ ≈ 0, non-finite state
``train-mode-in-eval``    batch-norm layers in training mode inside a model in eval mode
``frozen-updating``       frozen γ/β (``requires_grad=False``) but statistics still updating
``redundant-bias``        a Conv/Linear bias directly followed by batch norm (cancelled)
========================  ==================================================================

Conventions: the exact statistics are those :func:`bnorm.precise_bn` would set — the model runs
in training mode (each layer normalizes with its batch's statistics, as in training), the
variance is unbiased. Standardized mean shift of a channel:
:math:`|\hat\mu - \mu| / \sqrt{\sigma^2 + \epsilon}`; variance ratio
:math:`(\hat\sigma^2 + \epsilon) / (\sigma^2 + \epsilon)`, hats for the running statistics.
The original model is never run: every pass uses a deep copy, so the model is left exactly as
it was (parameters, buffers, flags, hooks).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..modules.frozen import _FrozenBatchNormBase
from ..modules.ghost import _GhostBatchNormBase
from ..modules.recurrent import RecurrentBatchNorm1d
from ..modules.renorm import _BatchRenormBase
from .precise import MergedStats, _step_of

__all__ = [
    "ACCURACY_GAP",
    "DEAD_GAMMA",
    "DEAD_VARIANCE",
    "INIT_WEIGHT",
    "MEAN_SHIFT",
    "NONIID_ALPHA",
    "NONIID_MIN_BATCHES",
    "NONIID_MIN_RATIO",
    "OUTPUT_CHANGE",
    "PRECISE_SHIFT",
    "PRECISE_VAR_RATIO",
    "SEVERITIES",
    "SMALL_BATCH_NOISE",
    "VAR_RATIO",
    "Diagnosis",
    "Finding",
    "Treatment",
    "add_parser",
    "doctor",
]

# --- thresholds (each rule's docstring says how it uses them) ---------------------------------

MEAN_SHIFT = 0.5
"""eval-mismatch: largest standardized mean shift |μ̂ − μ|/√(σ²+ε) tolerated (half a std)."""
VAR_RATIO = 2.0
"""eval-mismatch: largest variance ratio (σ̂²+ε)/(σ²+ε), or its inverse, tolerated."""
ACCURACY_GAP = 0.02
"""eval-mismatch is ``high`` when exact statistics gain this much eval-mode accuracy."""
OUTPUT_CHANGE = 0.25
"""eval-mismatch is ``high`` without targets when the eval outputs move by this much (relative
RMS) from running to exact statistics."""
INIT_WEIGHT = 0.05
"""unconverged: largest weight (1 − momentum)^n the initial running values may still carry."""
PRECISE_SHIFT = 0.1
"""unconverged is moot when every channel's standardized mean shift is at most this ..."""
PRECISE_VAR_RATIO = 1.1
"""... and its variance ratio within [1/this, this]: the statistics are already exact (as
after ``bnorm.precise_bn``), whatever the count says."""
NONIID_ALPHA = 1e-3
"""non-iid: false-alarm level of the chi-square cut on the between-batch variance ratio."""
NONIID_MIN_RATIO = 2.0
"""non-iid: smallest between-batch variance ratio worth reporting, whatever the test says."""
NONIID_MIN_BATCHES = 4
"""non-iid: fewer batches than this cannot be tested."""
SMALL_BATCH_NOISE = 0.3
"""small-batch: largest predicted noise of a batch mean, in stds of the channel (≈ 1/√N)."""
DEAD_VARIANCE = 0.01
"""degenerate: a channel whose variance is below this fraction of eps carries no signal."""
DEAD_GAMMA = 1e-3
"""degenerate: |γ_c| below this fraction of the layer's largest |γ| switches the channel off."""

SEVERITIES = ("high", "medium", "low")


@dataclass
class Finding:
    """One diagnosed problem: which rule, where, how bad, the numbers, why, and the fix."""

    rule: str
    layer: str
    severity: str
    numbers: dict[str, Any]
    explanation: str
    prescription: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "layer": self.layer,
            "severity": self.severity,
            "numbers": self.numbers,
            "explanation": self.explanation,
            "prescription": self.prescription,
        }


@dataclass
class LayerReport:
    """What was measured at one batch-norm layer (one time step of a recurrent one).

    Tensors are float64 of shape (C,); ``running_*`` are None for layers without running
    statistics; ``batch_means`` is (K, C), one row per batch, ``batch_sizes`` the K sample
    counts; ``sample_var`` the unbiased variance over samples of each sample's channel mean.
    """

    name: str
    kind: str
    count: int
    mean: Tensor
    var: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    batch_means: Tensor
    batch_sizes: list[int]
    sample_var: Tensor
    eps: float

    def shift(self) -> Tensor:
        """Per-channel standardized mean shift |μ̂ − μ|/√(σ²+ε)."""
        assert self.running_mean is not None
        return (self.running_mean - self.mean).abs() / (self.var + self.eps).sqrt()

    def var_ratio(self) -> Tensor:
        """Per-channel (σ̂²+ε)/(σ²+ε)."""
        assert self.running_var is not None
        return (self.running_var + self.eps) / (self.var + self.eps)

    def to_dict(self) -> dict[str, Any]:
        def lst(t: Tensor | None) -> list[float] | None:
            return None if t is None else [_num(v) for v in t.tolist()]

        return {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "batches": len(self.batch_sizes),
            "mean": lst(self.mean),
            "var": lst(self.var),
            "running_mean": lst(self.running_mean),
            "running_var": lst(self.running_var),
        }


def _clean(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/Inf)."""
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _num(v: float) -> float | None:
    """JSON has no NaN/Inf: those become None."""
    return float(v) if math.isfinite(v) else None


# --- the rules: pure functions of measured numbers -------------------------------------------


def mismatch_numbers(shift: Tensor, ratio: Tensor) -> dict[str, float]:
    """Layer summary of the per-channel shift and variance ratio (worst channel, median)."""
    log_ratio = ratio.log().abs()
    worst = int(log_ratio.argmax())
    return {
        "max_mean_shift": float(shift.max()),
        "median_mean_shift": float(shift.median()),
        "worst_var_ratio": float(ratio[worst]),
        "channels_off": int(((shift > MEAN_SHIFT) | (log_ratio > math.log(VAR_RATIO))).sum()),
    }


def is_mismatched(max_mean_shift: float, worst_var_ratio: float) -> bool:
    """eval-mismatch fires when the worst channel's standardized mean shift exceeds
    :data:`MEAN_SHIFT` or its variance ratio lies outside [1/:data:`VAR_RATIO`,
    :data:`VAR_RATIO`]: normalizing with the running statistics then moves that channel by
    more than half a standard deviation or rescales it by more than the ratio's square root."""
    return (
        max_mean_shift > MEAN_SHIFT
        or worst_var_ratio > VAR_RATIO
        or worst_var_ratio < 1.0 / VAR_RATIO
    )


def mismatch_severity(accuracy_gain: float | None, output_change: float | None) -> str:
    """``high`` when exact statistics gain at least :data:`ACCURACY_GAP` of eval-mode accuracy
    or, without targets, move the eval outputs by more than :data:`OUTPUT_CHANGE` (relative
    RMS); ``medium`` otherwise."""
    if accuracy_gain is not None:
        return "high" if accuracy_gain >= ACCURACY_GAP else "medium"
    return "high" if (output_change or 0.0) > OUTPUT_CHANGE else "medium"


def init_weight(momentum: float | None, num_batches_tracked: int) -> float:
    """Weight the initial running values still carry after ``num_batches_tracked`` updates:
    ``(1 − momentum)^n`` for an exponential average, 1 before the first update of a cumulative
    one (``momentum=None``) and 0 after it."""
    if momentum is None:
        return 1.0 if num_batches_tracked == 0 else 0.0
    return (1.0 - momentum) ** num_batches_tracked


def is_unconverged(
    weight: float, max_mean_shift: float | None = None, worst_var_ratio: float | None = None
) -> bool:
    """unconverged fires when the initial values weigh more than :data:`INIT_WEIGHT` — unless
    the running statistics are known to be already exact: shift ≤ :data:`PRECISE_SHIFT` and
    ratio within :data:`PRECISE_VAR_RATIO` (``bnorm.precise_bn`` sets the statistics but, not
    being training, leaves ``num_batches_tracked`` as it was)."""
    if weight <= INIT_WEIGHT:
        return False
    if max_mean_shift is None or worst_var_ratio is None:
        return True
    precise = (
        max_mean_shift <= PRECISE_SHIFT
        and 1.0 / PRECISE_VAR_RATIO <= worst_var_ratio <= PRECISE_VAR_RATIO
    )
    return not precise


def chi2_quantile(p: float, dof: int) -> float:
    """The p-quantile of a chi-square with ``dof`` degrees of freedom (Wilson–Hilferty: the
    cube root of χ²/k is close to normal). At p = 0.999 it errs high, by under 2% for k ≥ 3
    and under 1% for k ≥ 10: the cut is slightly conservative (fewer false alarms)."""
    z = statistics.NormalDist().inv_cdf(p)
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def between_batch_ratio(
    batch_means: Tensor, batch_sizes: Sequence[int], sample_var: Tensor
) -> Tensor:
    r"""Per channel, the spread of the batch means against what i.i.d. sampling predicts:

    .. math::  R = \frac{1}{K-1}\sum_k N_k (m_k - \bar m)^2 \Big/ \tau^2,

    :math:`m_k` the mean of batch k (N_k samples), :math:`\bar m` their weighted mean,
    :math:`\tau^2` the variance over all samples of a sample's channel mean. If the samples of
    the batches are i.i.d., :math:`\operatorname{Var} m_k = \tau^2/N_k` and R follows about
    :math:`\chi^2_{K-1}/(K-1)` (one-way ANOVA's between-groups mean square), so R ≈ 1; batches
    drawn from one class at a time (an unshuffled loader) give R ≫ 1. Samples, not values: the
    positions of one image are correlated, so dividing by N·H·W would overstate the evidence.
    Since τ² contains the between-batch spread itself, R cannot exceed about N (the samples per
    batch): batches of 2 cannot reveal a grouped loader. Channels with τ² = 0 give NaN.
    """
    n = torch.tensor(batch_sizes, dtype=torch.float64).unsqueeze(1)
    grand = (n * batch_means).sum(0) / n.sum()
    between = (n * (batch_means - grand) ** 2).sum(0) / (len(batch_sizes) - 1)
    return torch.where(sample_var > 0, between / sample_var, torch.nan)


def noniid_cut(num_batches: int) -> float:
    """The value of the median channel's R above which batches are called non-i.i.d.

    Under i.i.d. sampling each channel's (K−1)·R is about χ²_{K−1}; its (1 − α) quantile,
    α = :data:`NONIID_ALPHA`, bounds one channel's false alarms by α. The rule looks at the
    *median* over channels (channels are correlated, so their R's are not independent
    evidence): the median exceeds the cut only if half the channels do, which by Markov's
    inequality happens with probability at most 2α whatever the correlation. Many batches make
    the cut approach 1, so an effect size floor, :data:`NONIID_MIN_RATIO`, applies too.
    """
    dof = num_batches - 1
    return max(chi2_quantile(1.0 - NONIID_ALPHA, dof) / dof, NONIID_MIN_RATIO)


def is_noniid(median_ratio: float, num_batches: int) -> bool:
    """non-iid fires when the median channel's R exceeds :func:`noniid_cut` (and at least
    :data:`NONIID_MIN_BATCHES` batches were seen)."""
    return num_batches >= NONIID_MIN_BATCHES and median_ratio > noniid_cut(num_batches)


def batch_noise(sample_var: Tensor, var: Tensor, batch_size: float) -> Tensor:
    r"""Per channel, the standard deviation of a batch mean under i.i.d. sampling, in units of
    the channel's standard deviation: :math:`\sqrt{\tau^2 / (N \sigma^2)}` — 1/√N when every
    value of a sample is one channel value (N, C), less when spatial positions average out."""
    return (sample_var / (batch_size * var)).sqrt()


def is_small_batch(noise: float) -> bool:
    """small-batch fires when the median channel's batch-mean noise exceeds
    :data:`SMALL_BATCH_NOISE` (about N < 11 samples for (N, C) inputs); the batch variance is
    then as noisy, and training normalizes with statistics evaluation never sees."""
    return noise > SMALL_BATCH_NOISE


def dead_channels(var: Tensor, eps: float) -> list[int]:
    """Channels whose variance is below :data:`DEAD_VARIANCE` · eps: after normalization their
    standard deviation is under 0.1 and eps, not the data, sets it."""
    return [int(c) for c in torch.nonzero(var < DEAD_VARIANCE * eps).flatten()]


def dead_gammas(weight: Tensor) -> list[int]:
    """Channels with |γ_c| ≤ :data:`DEAD_GAMMA` · max|γ| (none if every γ is 0 or NaN)."""
    top = weight.abs().max()
    if not torch.isfinite(top) or top == 0:
        return []
    return [int(c) for c in torch.nonzero(weight.abs() <= DEAD_GAMMA * top).flatten()]


# --- the diagnosis ---------------------------------------------------------------------------


@dataclass
class Diagnosis:
    """What :func:`doctor` found: ``findings`` worst first, per-layer measurements, and the
    model-level effect of the running statistics (``effect``).

    ``print(diagnosis)`` is a compact table; :meth:`to_json`, :meth:`to_html` and
    :meth:`apply` (safe prescriptions on a copy, re-measured) are the rest of the output.
    """

    findings: list[Finding]
    layers: list[LayerReport]
    effect: dict[str, Any]
    model_name: str = "model"
    batches_used: int = 0
    _model: nn.Module | None = field(default=None, repr=False)
    _batches: list[Any] = field(default_factory=list, repr=False)
    _loss_fn: Callable[..., Tensor] | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return not self.findings

    def rules(self) -> set[str]:
        """The rules that fired."""
        return {f.rule for f in self.findings}

    def __str__(self) -> str:
        from .doctor_report import render_text

        return render_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "batches": self.batches_used,
            "healthy": self.healthy,
            "effect": self.effect,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The diagnosis as JSON text (NaN/Inf as null); written to ``path`` if given."""
        text = json.dumps(_clean(self.to_dict()), indent=1, allow_nan=False)
        if path is not None:
            _write(Path(path), text)
        return text

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page (inline SVG charts per layer) to ``path``."""
        from .doctor_report import render_html

        out = Path(path)
        _write(out, render_html(self))
        return out

    def apply(self, batches: Iterable[Any] | None = None) -> Treatment:
        """Apply the safe prescriptions to a *copy* of the model and diagnose it again.

        Safe means it changes no weight and no architecture: ``bnorm.precise_bn`` (over
        ``batches``, default the diagnosed ones; pass i.i.d. batches when ``non-iid`` fired)
        for eval-mismatch/unconverged/untrained, ``bnorm.freeze`` of the layers of
        ``frozen-updating``, ``.eval()`` of the layers of ``train-mode-in-eval``. The model
        itself is not changed. Returns a :class:`Treatment` with the treated copy and the
        diagnoses before and after.
        """
        from .freeze import freeze
        from .precise import precise_bn

        if self._model is None:
            raise RuntimeError("apply: this diagnosis holds no model")
        model = copy.deepcopy(self._model)
        named = dict(model.named_modules())
        applied: list[str] = []
        rules = self.rules()
        for f in self.findings:
            if f.rule == "train-mode-in-eval" and f.layer in named:
                named[f.layer].eval()
                applied.append(f"{_ref(f.layer)}.eval()")
        # exact statistics first: freezing then keeps them
        if rules & {"eval-mismatch", "unconverged", "untrained"}:
            precise_bn(model, self._batches if batches is None else batches)
            applied.append("bnorm.precise_bn(model, batches)")
        for f in self.findings:
            if f.rule == "frozen-updating" and f.layer in named:
                layer = named[f.layer]
                frozen = freeze(layer)
                if frozen is layer:  # freeze leaves BatchNormAct alone: evaluation mode fixes it
                    layer.eval()
                    applied.append(f"{_ref(f.layer)}.eval()")
                else:
                    _set_module(model, f.layer, frozen)
                    applied.append(f"{_ref(f.layer)} = bnorm.freeze({_ref(f.layer)})")
        after = doctor(
            model,
            self._batches,
            loss_fn=self._loss_fn,
            name=self.model_name,
        )
        return Treatment(model=model, before=self, after=after, applied=applied)


@dataclass
class Treatment:
    """The result of :meth:`Diagnosis.apply`: the treated copy and both diagnoses."""

    model: nn.Module
    before: Diagnosis
    after: Diagnosis
    applied: list[str]

    def __str__(self) -> str:
        from .doctor_report import render_treatment

        return render_treatment(self)


def _ref(name: str) -> str:
    """Python for the submodule ``name`` of ``model`` (``model.features[1]``)."""
    out = "model"
    for part in name.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def _write(path: Path, text: str) -> None:
    # a plain open() creates the file with the user's umask (a temp file would be 0600)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- measuring -------------------------------------------------------------------------------


def _is_bn(m: nn.Module) -> bool:
    return isinstance(
        m, nn.modules.batchnorm._BatchNorm | _FrozenBatchNormBase | RecurrentBatchNorm1d
    )


class _Recorder:
    """Per (layer, step): exact stats of the values, of the per-sample means, and batch means."""

    def __init__(self) -> None:
        self.values = MergedStats()
        self.samples = MergedStats()
        self.batch_means: list[Tensor] = []
        self.batch_sizes: list[int] = []

    def add(self, x: Tensor) -> None:
        x = x.detach()
        if x.dim() < 2 or x.shape[0] == 0:
            return
        self.values.add(x)
        per_sample = x.to(torch.float64).flatten(2).mean(2) if x.dim() > 2 else x.double()
        self.samples.add(per_sample)
        self.batch_means.append(per_sample.mean(0))
        self.batch_sizes.append(int(x.shape[0]))


def _split(batch: Any) -> tuple[Any, Any]:
    """``(input, target)`` of a batch: a tensor is an input alone; a tuple/list is
    ``(input, target, ...)`` — the convention of :func:`bnorm.precise_bn`."""
    if isinstance(batch, tuple | list):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def doctor(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    targets: Iterable[Any] | None = None,
    *,
    name: str = "model",
) -> Diagnosis:
    """Diagnose the batch normalization of ``model`` on ``batches``; returns a :class:`Diagnosis`.

    Layers: every ``torch.nn`` batch norm (``_BatchNorm``: ``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``) and bnorm's layers built on them (``BatchNorm*``, ``BatchRenorm*``,
    ``GhostBatchNorm*``, ``BatchNormAct*``), ``FrozenBatchNorm*`` and ``RecurrentBatchNorm1d``
    (per time step) — the model is not converted.

    How: on a deep copy, the batches run once in training mode under ``torch.no_grad()`` with
    every momentum at 0 (as :func:`bnorm.precise_bn`); forward pre-hooks merge each layer's
    input into float64 accumulators (overall, per sample, per batch). Then the copy runs in
    evaluation mode twice: with its running statistics and with the exact ones (the model-level
    effect: relative output change, accuracy when the outputs are class scores and targets are
    given, loss with ``loss_fn``). The model passed in is never run and is left exactly as it
    was.

    Args:
        model: any ``nn.Module`` with batch-norm layers.
        batches: as :func:`bnorm.precise_bn`: tensors, or tuples/lists ``(input, target, ...)``
            (e.g. a DataLoader). Pass them as your training loader yields them: the
            ``non-iid`` and ``small-batch`` rules judge these batches.
        num_batches: use at most this many (default all).
        loss_fn: ``loss_fn(output, target)`` → scalar tensor, for the loss in eval mode.
        targets: targets aligned with ``batches`` when the batches are bare inputs.
        name: how the model is named in the output.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no batch-norm layer, no batch, or ``num_batches`` < 1.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: expected a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"doctor: num_batches must be a positive int or None, got {num_batches!r}")
    if not any(_is_bn(m) for m in model.modules()):
        raise ValueError("doctor: the model has no batch-norm layer")
    inputs: list[Any] = []
    labels: list[Any] = []
    for batch in batches:
        if num_batches is not None and len(inputs) >= num_batches:
            break
        x, y = _split(batch)
        inputs.append(x)
        labels.append(y)
    if not inputs:
        raise ValueError("doctor: `batches` yielded no batch")
    if targets is not None:
        labels = list(targets)[: len(inputs)]
    have_targets = len(labels) == len(inputs) and all(y is not None for y in labels)

    work = copy.deepcopy(model)
    layers = {n: m for n, m in work.named_modules() if _is_bn(m)}
    records, producers = _measure(work, layers, inputs)
    reports = _reports(layers, records)
    effect = _effect(work, layers, reports, inputs, labels if have_targets else None, loss_fn)
    findings = _findings(model, layers, reports, producers, effect)
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), _RULES.index(f.rule), f.layer))
    return Diagnosis(
        findings=findings,
        layers=reports,
        effect=effect,
        model_name=name,
        batches_used=len(inputs),
        _model=copy.deepcopy(model),
        _batches=inputs if not have_targets else list(zip(inputs, labels, strict=True)),
        _loss_fn=loss_fn,
    )


_PRODUCERS = (nn.Linear, nn.modules.conv._ConvNd)


def _measure(
    work: nn.Module, layers: dict[str, nn.Module], inputs: list[Any]
) -> tuple[dict[tuple[str, int], _Recorder], dict[str, tuple[str, nn.Module]]]:
    """Run ``inputs`` through ``work`` in training mode; record every layer's inputs and which
    Conv/Linear (with a bias) produced a layer's input tensor directly."""
    names = {m: n for n, m in layers.items()}
    records: dict[tuple[str, int], _Recorder] = {}
    produced: dict[int, tuple[Tensor, str, nn.Module]] = {}
    producers: dict[str, tuple[str, nn.Module]] = {}
    first = [True]

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        key = (names[m], _step_of(m, args, kwargs))
        records.setdefault(key, _Recorder()).add(x)
        hit = produced.get(id(x))
        if first[0] and hit is not None and hit[0] is x:
            producers[names[m]] = (hit[1], hit[2])

    def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if first[0] and isinstance(out, Tensor) and getattr(m, "bias", None) is not None:
            produced[id(out)] = (out, prod_names[m], m)

    prod_names = {m: n for n, m in work.named_modules() if isinstance(m, _PRODUCERS)}
    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in layers.values()]
    handles += [m.register_forward_hook(post) for m in prod_names]
    for m in layers.values():
        if hasattr(m, "momentum"):
            m.momentum = 0.0
    work.train()
    try:
        with torch.no_grad():
            for x in inputs:
                work(x)
                first[0] = False
                produced.clear()
    finally:
        for h in handles:
            h.remove()
    return records, producers


def _reports(
    layers: dict[str, nn.Module], records: dict[tuple[str, int], _Recorder]
) -> list[LayerReport]:
    out = []
    for (name, step), rec in sorted(records.items()):
        m = layers[name]
        if rec.values.count < 2:
            continue
        assert rec.values.mean is not None
        rm = getattr(m, "running_mean", None)
        rv = getattr(m, "running_var", None)
        if isinstance(m, RecurrentBatchNorm1d):
            rm, rv = rm[step], rv[step]
        label = f"{name}[t={step}]" if isinstance(m, RecurrentBatchNorm1d) else name
        out.append(
            LayerReport(
                name=label,
                kind=type(m).__name__,
                count=rec.values.count,
                mean=rec.values.mean,
                var=rec.values.unbiased_var,
                running_mean=None if rm is None else rm.detach().double().clone(),
                running_var=None if rv is None else rv.detach().double().clone(),
                batch_means=torch.stack(rec.batch_means),
                batch_sizes=rec.batch_sizes,
                sample_var=rec.samples.unbiased_var
                if rec.samples.count > 1
                else torch.zeros_like(rec.values.mean),
                eps=float(m.eps),
            )
        )
    return out


def _outputs(model: nn.Module, inputs: list[Any]) -> list[Tensor]:
    with torch.no_grad():
        outs = [model(x) for x in inputs]
    return [o.detach().double() if isinstance(o, Tensor) else torch.zeros(0) for o in outs]


def _effect(
    work: nn.Module,
    layers: dict[str, nn.Module],
    reports: list[LayerReport],
    inputs: list[Any],
    labels: list[Any] | None,
    loss_fn: Callable[..., Tensor] | None,
) -> dict[str, Any]:
    """Eval-mode outputs with the running statistics against with the exact ones."""
    tracked = [r for r in reports if r.running_mean is not None]
    if not tracked:
        return {}
    work.eval()
    running = _outputs(work, inputs)
    with torch.no_grad():
        for r in tracked:
            name, _, step = r.name.partition("[t=")
            m = layers[name]
            rm, rv = m.running_mean, m.running_var
            if step:
                s = int(step.rstrip("]"))
                rm, rv = rm[s], rv[s]
            rm.copy_(r.mean)
            rv.copy_(r.var)
    exact = _outputs(work, inputs)
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(running, exact, strict=True))
    den = sum(float((b**2).sum()) for b in exact)
    effect: dict[str, Any] = {"output_change": _num(math.sqrt(num / den)) if den > 0 else None}
    if labels is not None:
        acc = [_accuracy(o, y) for o, y in ((running, labels), (exact, labels))]
        if None not in acc:
            effect["accuracy_running"], effect["accuracy_exact"] = acc
        if loss_fn is not None:
            with torch.no_grad():
                for key, outs in (("loss_running", running), ("loss_exact", exact)):
                    total = sum(
                        float(loss_fn(o.float(), y)) * len(o)
                        for o, y in zip(outs, labels, strict=True)
                    )
                    effect[key] = _num(total / sum(len(o) for o in outs))
    return effect


def _accuracy(outputs: list[Tensor], labels: list[Any]) -> float | None:
    """Top-1 accuracy when outputs are (N, classes) scores and labels (N,) class indices."""
    correct = total = 0
    for o, y in zip(outputs, labels, strict=True):
        if not (
            isinstance(y, Tensor) and o.dim() == 2 and y.dim() == 1 and not y.is_floating_point()
        ):
            return None
        correct += int((o.argmax(1) == y).sum())
        total += len(y)
    return correct / total if total else None


def _findings(
    original: nn.Module,
    layers: dict[str, nn.Module],
    reports: list[LayerReport],
    producers: dict[str, tuple[str, nn.Module]],
    effect: dict[str, Any],
) -> list[Finding]:
    found: list[Finding] = []
    orig = dict(original.named_modules())
    gain = None
    if "accuracy_exact" in effect:
        gain = effect["accuracy_exact"] - effect["accuracy_running"]
    for r in reports:
        found += _statistics_findings(r, orig[r.name.partition("[t=")[0]], gain, effect)
    closeness: dict[str, tuple[float, float]] = {}
    for r in reports:
        if r.running_mean is None or r.running_var is None:
            continue
        shift, ratio = float(r.shift().max()), r.var_ratio()
        worst = float(ratio[ratio.log().abs().argmax()])
        base = r.name.partition("[t=")[0]
        old = closeness.get(base, (0.0, 1.0))
        closeness[base] = (
            max(shift, old[0]),
            worst if abs(math.log(worst)) > abs(math.log(old[1])) else old[1],
        )
    for name, m in orig.items():
        if name in layers:
            found += _state_findings(name, m, original, closeness.get(name))
    for name, (pname, producer) in producers.items():
        m = orig[name]
        channels = getattr(m, "num_features", None)
        out_channels = getattr(producer, "out_features", None) or getattr(
            producer, "out_channels", None
        )
        if channels != out_channels:
            continue
        b = producer.bias.detach()
        kind = type(producer).__name__
        found.append(
            Finding(
                "redundant-bias",
                pname,
                "low",
                {
                    "bias_parameters": int(b.numel()),
                    "max_abs_bias": _num(float(b.abs().max())),
                    "followed_by": name,
                },
                f"{kind} '{pname}' adds a bias that the batch norm '{name}' right after it "
                "subtracts again with the mean: parameters and compute for nothing.",
                f"{_ref(pname)} = nn.{kind}(..., bias=False)  # β of the batch norm is the bias",
            )
        )
    return found


def _statistics_findings(
    r: LayerReport, m: nn.Module, gain: float | None, effect: dict[str, Any]
) -> list[Finding]:
    out: list[Finding] = []
    frozen = isinstance(m, _FrozenBatchNormBase)
    # a frozen layer's statistics are fixed on purpose (fine-tuning): charted, not judged
    if r.running_mean is not None and r.running_var is not None and not frozen:
        numbers = mismatch_numbers(r.shift(), r.var_ratio())
        if is_mismatched(numbers["max_mean_shift"], numbers["worst_var_ratio"]):
            numbers.update(effect)
            out.append(
                Finding(
                    "eval-mismatch",
                    r.name,
                    mismatch_severity(gain, effect.get("output_change")),
                    numbers,
                    "In evaluation the layer normalizes with running statistics that differ from "
                    "the statistics of its inputs, so eval-mode outputs differ from what training "
                    "taught the next layers.",
                    "bnorm.precise_bn(model, batches)  # exact statistics over i.i.d. batches",
                )
            )
    if r.batch_means.shape[0] >= NONIID_MIN_BATCHES and not frozen:
        ratio = between_batch_ratio(r.batch_means, r.batch_sizes, r.sample_var)
        finite = ratio[torch.isfinite(ratio)]
        if finite.numel():
            median = float(finite.median())
            k = r.batch_means.shape[0]
            if is_noniid(median, k):
                out.append(
                    Finding(
                        "non-iid",
                        r.name,
                        "high",
                        {
                            "between_batch_var_ratio": median,
                            "iid_cut": noniid_cut(k),
                            "batches": k,
                        },
                        "The batch means spread far more than i.i.d. sampling allows (an "
                        "unshuffled or grouped loader): every batch normalizes with statistics "
                        "of a subpopulation, and the running average tracks the last batches.",
                        "DataLoader(dataset, batch_size=..., shuffle=True)  # then "
                        "bnorm.precise_bn(model, shuffled_batches)",
                    )
                )
    if not frozen and not isinstance(m, _BatchRenormBase):
        size = float(statistics.median(r.batch_sizes))
        if isinstance(m, _GhostBatchNormBase):
            size = min(size, float(m.virtual_batch_size))
        live = r.var > DEAD_VARIANCE * r.eps
        if bool(live.any()):
            noise = float(batch_noise(r.sample_var[live], r.var[live], size).median())
            if is_small_batch(noise):
                rank = next(
                    (
                        k
                        for t, k in ((nn.BatchNorm1d, "1d"), (nn.BatchNorm3d, "3d"))
                        if isinstance(m, t)
                    ),
                    "1d" if isinstance(m, RecurrentBatchNorm1d) else "2d",
                )
                out.append(
                    Finding(
                        "small-batch",
                        r.name,
                        "medium",
                        {
                            "samples_per_batch": size,
                            "values_per_channel_per_batch": r.count / len(r.batch_sizes),
                            "batch_mean_noise": noise,
                        },
                        "Batches this small give batch statistics noisy by a sizeable fraction "
                        "of a standard deviation: training normalizes with numbers that "
                        "evaluation never sees.",
                        f"{_ref(r.name.partition('[t=')[0])} = bnorm.BatchRenorm{rank}"
                        f"({r.mean.numel()})  # or nn.GroupNorm, or larger batches",
                    )
                )
    dead = dead_channels(r.var, r.eps)
    if r.running_var is not None:
        dead = sorted(set(dead) | set(dead_channels(r.running_var, r.eps)))
    if dead:
        out.append(
            Finding(
                "degenerate",
                r.name,
                "medium",
                {"dead_channels": dead, "channels": int(r.mean.numel())},
                "These channels have (almost) no variance: they carry no signal and eps, not "
                "the data, sets their scale (a dead ReLU or a zeroed filter upstream).",
                f"prune channels {_short(dead)} of {_ref(r.name.partition('[t=')[0])}, or "
                "re-initialize the layer that feeds them",
            )
        )
    return out


def _short(idx: list[int]) -> str:
    return str(idx) if len(idx) <= 6 else f"[{', '.join(map(str, idx[:6]))}, …] ({len(idx)})"


def _state_findings(
    name: str, m: nn.Module, model: nn.Module, closeness: tuple[float, float] | None
) -> list[Finding]:
    """Rules on a layer's state and flags; ``closeness`` is (max shift, worst variance ratio)
    of its running statistics against the exact ones, when measured."""
    out: list[Finding] = []
    tensors = {k: getattr(m, k, None) for k in ("weight", "bias", "running_mean", "running_var")}
    bad = [k for k, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all())]
    if bad:
        out.append(
            Finding(
                "degenerate",
                name,
                "high",
                {"non_finite": bad},
                "The layer holds NaN or Inf: every output through it is non-finite.",
                "reload a checkpoint from before the divergence; train with "
                "on_nonfinite='raise' on bnorm's layers to stop at the first bad batch",
            )
        )
    w = tensors["weight"]
    if w is not None and not isinstance(m, _FrozenBatchNormBase):
        off = dead_gammas(w.detach().double())
        if off:
            out.append(
                Finding(
                    "degenerate",
                    name,
                    "medium",
                    {"zero_gamma_channels": off, "channels": int(w.numel())},
                    "γ ≈ 0 multiplies these channels' normalized values by zero: they are "
                    "switched off.",
                    f"prune channels {_short(off)} of {_ref(name)} (bnorm.fold then drops them "
                    "at inference), or lower the weight decay on γ",
                )
            )
    rm, rv = tensors["running_mean"], tensors["running_var"]
    nbt = getattr(m, "num_batches_tracked", None)
    trackable = (
        rm is not None
        and rv is not None
        and nbt is not None
        and not isinstance(m, _FrozenBatchNormBase)
    )
    if trackable:
        steps = [int(v) for v in nbt.flatten().tolist()]
        fresh = bool((rm == 0).all()) and bool((rv == 1).all())
        if fresh and max(steps) == 0:
            out.append(
                Finding(
                    "untrained",
                    name,
                    "high",
                    {"num_batches_tracked": max(steps), "running_mean": 0.0, "running_var": 1.0},
                    "The running statistics are still their initial values (mean 0, variance "
                    "1): evaluation normalizes with numbers that never saw the data.",
                    "bnorm.precise_bn(model, batches)",
                )
            )
        else:
            n = min(steps)
            weight = init_weight(m.momentum, n)
            if is_unconverged(weight, *(closeness or (None, None))):
                out.append(
                    Finding(
                        "unconverged",
                        name,
                        "high" if weight > 0.5 else "medium",
                        {"num_batches_tracked": n, "momentum": m.momentum, "init_weight": weight},
                        f"After {n} updates at momentum {m.momentum} the initial running values "
                        f"still weigh {weight:.0%}: the statistics have not converged.",
                        "bnorm.precise_bn(model, batches)",
                    )
                )
    if not model.training and m.training and not isinstance(m, _FrozenBatchNormBase):
        out.append(
            Finding(
                "train-mode-in-eval",
                name,
                "high",
                {"model_training": False, "layer_training": True},
                "The model is in evaluation mode but this layer is in training mode: it "
                "normalizes with the statistics of whatever batch comes, and updates its "
                "running statistics at inference.",
                "model.eval()  # after any .train() on a submodule",
            )
        )
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
    updating = (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.momentum != 0
        and m.training
    )
    if updating and params and all(not p.requires_grad for p in params):
        out.append(
            Finding(
                "frozen-updating",
                name,
                "medium",
                {"requires_grad": False, "training": True, "momentum": m.momentum},
                "γ and β are frozen but the layer is in training mode, so every training batch "
                "still moves its running statistics: the frozen part drifts.",
                f"{_ref(name)} = bnorm.freeze({_ref(name)})  # or bnorm.freeze(backbone)",
            )
        )
    return out


_RULES = (
    "degenerate",
    "train-mode-in-eval",
    "untrained",
    "eval-mismatch",
    "non-iid",
    "unconverged",
    "small-batch",
    "frozen-updating",
    "redundant-bias",
)


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``bnorm doctor`` (its code is in :mod:`bnorm.tools.doctor_report`)."""
    from .doctor_report import add_parser as _add

    _add(sub)
