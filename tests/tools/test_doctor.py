"""bnorm.doctor: every rule at its threshold, on its clinic pair, and the model left untouched."""

import copy
import importlib
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnorm
from bnorm.tools import clinic
from bnorm.tools.doctor import doctor

# the module (``bnorm.tools.doctor`` the attribute is the function, as bnorm.tools.freeze is)
D = importlib.import_module("bnorm.tools.doctor")

SICK = [name for name, e in clinic.EXAMPLES.items() if e.rule is not None]
HEALTHY = [name for name, e in clinic.EXAMPLES.items() if e.rule is None]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


def _down(x: float) -> float:
    return math.nextafter(x, -math.inf)


# --- thresholds at their boundaries, on synthetic numbers --------------------------------------


def test_mismatch_threshold_boundaries():
    assert not D.is_mismatched(D.MEAN_SHIFT, 1.0)
    assert D.is_mismatched(_up(D.MEAN_SHIFT), 1.0)
    assert not D.is_mismatched(0.0, D.VAR_RATIO)
    assert D.is_mismatched(0.0, _up(D.VAR_RATIO))
    assert not D.is_mismatched(0.0, 1.0 / D.VAR_RATIO)
    assert D.is_mismatched(0.0, _down(1.0 / D.VAR_RATIO))


def test_mismatch_severity_boundaries():
    assert D.mismatch_severity(D.ACCURACY_GAP, None) == "high"
    assert D.mismatch_severity(_down(D.ACCURACY_GAP), 10.0) == "medium"  # accuracy decides
    assert D.mismatch_severity(None, D.OUTPUT_CHANGE) == "medium"
    assert D.mismatch_severity(None, _up(D.OUTPUT_CHANGE)) == "high"
    assert D.mismatch_severity(None, None) == "medium"


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.3])
def test_unconverged_boundary_in_updates(momentum):
    """The first count whose initial weight (1-m)^n drops to INIT_WEIGHT stops the finding."""
    n_star = math.ceil(math.log(D.INIT_WEIGHT) / math.log(1.0 - momentum))
    assert D.is_unconverged(D.init_weight(momentum, n_star - 1))
    assert not D.is_unconverged(D.init_weight(momentum, n_star))
    assert not D.is_unconverged(D.INIT_WEIGHT)
    assert D.is_unconverged(_up(D.INIT_WEIGHT))


def test_unconverged_is_moot_for_exact_statistics():
    """After precise_bn the count is still small but the statistics are exact: no finding."""
    w = 0.9
    assert not D.is_unconverged(w, D.PRECISE_SHIFT, D.PRECISE_VAR_RATIO)
    assert not D.is_unconverged(w, D.PRECISE_SHIFT, 1.0 / D.PRECISE_VAR_RATIO)
    assert D.is_unconverged(w, _up(D.PRECISE_SHIFT), 1.0)
    assert D.is_unconverged(w, 0.0, _up(D.PRECISE_VAR_RATIO))
    assert D.is_unconverged(w, 0.0, _down(1.0 / D.PRECISE_VAR_RATIO))


def test_cumulative_average_weight():
    assert D.init_weight(None, 0) == 1.0
    assert D.init_weight(None, 1) == 0.0


@pytest.mark.parametrize("dof", [3, 10, 30, 200])
def test_chi2_quantile_matches_scipy(dof):
    scipy_stats = pytest.importorskip("scipy.stats")
    exact = scipy_stats.chi2.ppf(1 - D.NONIID_ALPHA, dof)
    approx = D.chi2_quantile(1 - D.NONIID_ALPHA, dof)
    assert exact <= approx <= exact * (1.02 if dof < 10 else 1.01)


@pytest.mark.parametrize("k", [D.NONIID_MIN_BATCHES, 10, 1000])
def test_noniid_threshold_boundaries(k):
    cut = D.noniid_cut(k)
    assert cut >= D.NONIID_MIN_RATIO
    assert not D.is_noniid(cut, k)
    assert D.is_noniid(_up(cut), k)
    assert not D.is_noniid(1e9, D.NONIID_MIN_BATCHES - 1)


def test_small_batch_and_dead_boundaries():
    assert not D.is_small_batch(D.SMALL_BATCH_NOISE)
    assert D.is_small_batch(_up(D.SMALL_BATCH_NOISE))
    eps = 1e-5
    edge = D.DEAD_VARIANCE * eps
    var = torch.tensor([edge, _down(edge), 1.0], dtype=torch.float64)
    assert D.dead_channels(var, eps) == [1]
    gamma = torch.tensor([1.0, D.DEAD_GAMMA, _up(D.DEAD_GAMMA), -D.DEAD_GAMMA], dtype=torch.float64)
    assert D.dead_gammas(gamma) == [1, 3]
    assert D.dead_gammas(torch.zeros(3, dtype=torch.float64)) == []


@given(st.integers(8, 64), st.integers(8, 40), st.integers(0, 2**31 - 1))
@settings(max_examples=15)
def test_batch_noise_and_ratio_match_iid_sampling(n, k, seed):
    """For (N, C) inputs the predicted noise is 1/sqrt(N); i.i.d. batches give R near 1 (the
    median over 64 channels of an F-like variable), batches with their own means (as sorted by
    class) R near N, above the cut. (R cannot exceed N: batches of 2 hide any grouping.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, 64, generator=g, dtype=torch.float64)
    var = torch.ones(64, dtype=torch.float64)
    noise = D.batch_noise(var, var, n)
    assert torch.allclose(noise, torch.full_like(noise, 1 / math.sqrt(n)))
    sample_var = x.reshape(-1, 64).var(0)
    ratio = D.between_batch_ratio(x.mean(1), [n] * k, sample_var)
    assert not D.is_noniid(float(ratio.median()), k)
    shifted = x + 10.0 * torch.arange(k, dtype=torch.float64).view(k, 1, 1)  # a mean per batch
    ratio = D.between_batch_ratio(shifted.mean(1), [n] * k, shifted.reshape(-1, 64).var(0))
    assert D.is_noniid(float(ratio.median()), k)


# --- the clinic: every planted defect found, nothing on the healthy twins, cures measured ------


@pytest.mark.parametrize("name", SICK)
def test_clinic_flags_planted_defect(name):
    model, batches, targets = clinic.example(name)
    diagnosis = doctor(model, batches, targets=targets, name=name)
    assert clinic.EXAMPLES[name].rule in diagnosis.rules(), str(diagnosis)
    twin = clinic.EXAMPLES[name].twin
    assert twin in clinic.EXAMPLES and clinic.EXAMPLES[twin].rule is None


@pytest.mark.parametrize("name", HEALTHY)
def test_clinic_healthy_twin_has_no_finding(name):
    model, batches, targets = clinic.example(name)
    diagnosis = doctor(model, batches, targets=targets, name=name)
    assert diagnosis.healthy, str(diagnosis)
    assert "no findings" in str(diagnosis)


@pytest.mark.parametrize("name", SICK)
def test_clinic_prescription_cures_the_symptom(name):
    result = clinic.cure(name)
    before, after = result["before"], result["after"]
    if name in ("few-steps", "batch-2", "partial-eval"):
        assert after > before  # eval-mode test accuracy
    elif name == "unshuffled":
        assert before[0] > D.noniid_cut(20) and after[0] < D.noniid_cut(20)
        assert after[1] > before[1]
    elif name == "frozen-backbone":
        assert before[0] > 0 and after[0] == 0  # running-mean drift
        assert after[1] >= before[1]  # the original task through the backbone
    elif name == "dead-channel":
        assert before[0] > 0 and after[0] == 0
        assert after[1] < before[1] and after[2] < 1e-4  # fewer parameters, same outputs
    else:
        assert after[0] < before[0] and after[1] < 1e-4


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("few-steps", "unconverged"),
        ("few-steps", "eval-mismatch"),
        ("frozen-backbone", "frozen-updating"),
        ("partial-eval", "train-mode-in-eval"),
    ],
)
def test_apply_cures_on_a_copy(name, rule):
    model, batches, _ = clinic.example(name)
    state = copy.deepcopy(model.state_dict())
    diagnosis = doctor(model, batches)
    assert rule in diagnosis.rules()
    treatment = diagnosis.apply()
    assert rule not in treatment.after.rules(), str(treatment)
    assert treatment.model is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    if name == "few-steps":
        d = clinic.digits()
        assert clinic.accuracy(treatment.model.eval(), d.x_test, d.y_test) > clinic.accuracy(
            model.eval(), d.x_test, d.y_test
        )
    assert "cured:" in str(treatment)


# --- the model is left exactly as it was ----------------------------------------------------


class Recurrent(nn.Module):
    """Three time steps through one recurrent batch norm (per-step statistics)."""

    def __init__(self):
        super().__init__()
        self.bn = bnorm.RecurrentBatchNorm1d(4, max_steps=2)

    def forward(self, x):
        return torch.stack([self.bn(x[:, t], t) for t in range(x.shape[1])], 1)


def _zoo(c=3, n=8, hw=4, k=5, seed=0):
    """Torch's and bnorm's layers in one model: C channels, K batches of N samples, HW×HW."""
    torch.manual_seed(seed)
    conv = nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        bnorm.BatchNorm2d(c, momentum=None),
        bnorm.BatchNormAct2d(c),
        bnorm.BatchRenorm2d(c, r_max=2.0, d_max=1.0),
        bnorm.FrozenBatchNorm2d(c),
        nn.SyncBatchNorm(c),
        bnorm.SyncBatchNorm(c),
        nn.Flatten(),
        nn.Linear(c * hw * hw, 6),
        bnorm.GhostBatchNorm1d(6, 2),
        nn.Dropout(0.5),
    )
    conv[6].running_var.fill_(2.0)
    conv[1].weight.requires_grad_(False)
    return conv, [torch.randn(n, 2, hw, hw) * 3 + 1 for _ in range(k)]


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
        {n: getattr(m, "momentum", None) for n, m in model.named_modules()},
    )


def _same(a, b):
    sa, *rest_a = a
    sb, *rest_b = b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert rest_a == rest_b


@given(
    st.sampled_from(["train", "eval", "partial"]),
    st.integers(1, 4),
    st.sampled_from([2, 4, 6]),
    st.integers(1, 4),
    st.integers(1, 5),
)
@settings(max_examples=12)
def test_model_left_exactly_as_it_was_torch_and_bnorm_layers(mode, c, n, hw, k):
    model, batches = _zoo(c, n, hw, k)
    model.train(mode == "train")
    if mode == "partial":
        model[3].train()
    before = _snapshot(model)
    diagnosis = doctor(model, batches)
    _same(before, _snapshot(model))
    kinds = {r.kind for r in diagnosis.layers}
    assert {"BatchNorm2d", "BatchNormAct2d", "BatchRenorm2d", "FrozenBatchNorm2d"} <= kinds
    assert {"GhostBatchNorm1d", "SyncBatchNorm"} <= kinds
    json.loads(diagnosis.to_json())


def test_a_batch_that_raises_leaves_the_model_as_it_was():
    """Ghost BN refuses a batch of 5 in virtual batches of 2: the error propagates, and the
    model is as it was."""
    model, batches = _zoo(n=5)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="virtual batch"):
        doctor(model, batches)
    _same(before, _snapshot(model))


def test_recurrent_layers_are_measured_per_step_and_left_alone():
    model = Recurrent().eval()
    x = [torch.randn(16, 3, 4) + 2.0 for _ in range(4)]
    before = _snapshot(model)
    diagnosis = doctor(model, x)
    _same(before, _snapshot(model))
    assert [r.name for r in diagnosis.layers] == ["bn[t=0]", "bn[t=1]"]
    assert diagnosis.layers[1].count == 2 * 16 * 4  # steps 1 and 2 share the last statistics
    assert {"untrained", "eval-mismatch"} <= diagnosis.rules()


@given(st.integers(1, 4), st.sampled_from([2, 6]), st.integers(1, 4), st.integers(1, 4))
@settings(max_examples=8)
def test_exact_statistics_match_precise_bn(c, n, hw, k):
    """The statistics the doctor measures are those precise_bn sets."""
    model, batches = _zoo(c, n, hw, k)
    diagnosis = doctor(model, batches)
    precise = bnorm.precise_bn(copy.deepcopy(model), batches)
    report = {r.name: r for r in diagnosis.layers}
    for name in ("1", "3", "5", "8"):
        layer = precise.get_submodule(name)
        torch.testing.assert_close(report[name].mean, layer.running_mean.double())
        torch.testing.assert_close(report[name].var, layer.running_var.double(), rtol=1e-5, atol=0)


# --- rules on small synthetic models --------------------------------------------------------


def test_redundant_bias_only_when_directly_followed():
    torch.manual_seed(0)
    direct = nn.Sequential(nn.Conv2d(2, 3, 3), bnorm.BatchNorm2d(3))
    indirect = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3))
    x = [torch.randn(4, 2, 5, 5) for _ in range(3)]
    found = [f for f in doctor(direct, x).findings if f.rule == "redundant-bias"]
    assert [f.layer for f in found] == ["0"] and found[0].numbers["bias_parameters"] == 3
    assert "bias=False" in found[0].prescription
    assert "redundant-bias" not in doctor(indirect, x).rules()


def test_degenerate_state_and_untrained():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn)
    x = [torch.randn(16, 3) for _ in range(3)]
    assert "untrained" in doctor(model, x).rules()
    with torch.no_grad():
        bn.running_var[1] = float("nan")
        bn.weight[2] = 0.0
    bn.num_batches_tracked.fill_(1000)
    diagnosis = doctor(model, x)
    worst = diagnosis.findings[0]
    assert worst.rule == "degenerate" and worst.severity == "high"
    assert worst.numbers["non_finite"] == ["running_var"]
    assert any(f.numbers.get("zero_gamma_channels") == [2] for f in diagnosis.findings)
    data = json.loads(diagnosis.to_json())
    assert data["layers"][0]["running_var"][1] is None


def test_frozen_updating_and_mode_rules_on_bnorm_layers():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bnorm.BatchNorm1d(4), nn.Linear(4, 2))
    x = [torch.randn(16, 3) for _ in range(3)]
    model[1].requires_grad_(False)
    assert "frozen-updating" in doctor(model.train(), x).rules()
    assert "frozen-updating" not in doctor(model.eval(), x).rules()
    model[1].train()
    assert "train-mode-in-eval" in doctor(model, x).rules()


@pytest.mark.parametrize("layer", [bnorm.BatchNorm1d, bnorm.BatchNormAct1d])
def test_apply_freezes_or_evals_frozen_updating_layers(layer):
    """freeze() leaves BatchNormAct alone, so apply() puts it in evaluation mode instead."""
    model = nn.Sequential(nn.Linear(3, 4, bias=False), layer(4), nn.Linear(4, 2)).train()
    model[1].requires_grad_(False)
    x = [torch.randn(16, 3) for _ in range(3)]
    treatment = doctor(model, x).apply()
    assert "frozen-updating" not in treatment.after.rules()
    assert model[1].training and type(model[1]) is layer  # the original is untouched


def test_targets_and_loss_give_model_level_effect():
    model, batches, _ = clinic.example("few-steps")
    xs = [x for x, _ in batches]
    ys = [y for _, y in batches]
    diagnosis = doctor(model, xs, targets=ys, loss_fn=nn.functional.cross_entropy)
    e = diagnosis.effect
    assert {"accuracy_running", "accuracy_exact", "loss_running", "loss_exact"} <= e.keys()
    assert e["loss_exact"] < e["loss_running"]
    mismatch = next(f for f in diagnosis.findings if f.rule == "eval-mismatch")
    assert mismatch.numbers["max_mean_shift"] > D.MEAN_SHIFT or not (
        1 / D.VAR_RATIO <= mismatch.numbers["worst_var_ratio"] <= D.VAR_RATIO
    )


def test_findings_sorted_worst_first_and_printed():
    model, batches, _ = clinic.example("unshuffled")
    diagnosis = doctor(model, batches)
    ranks = [D.SEVERITIES.index(f.severity) for f in diagnosis.findings]
    assert ranks == sorted(ranks)
    text = str(diagnosis)
    assert text.index("non-iid") < text.index("eval-mismatch")
    assert "fix: DataLoader" in text


@pytest.mark.parametrize(
    ("args", "error"),
    [((nn.Linear(2, 2), [torch.randn(2, 2)]), ValueError), (("model", []), TypeError)],
)
def test_bad_arguments(args, error):
    with pytest.raises(error):
        doctor(*args)


def test_no_batches_and_num_batches():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="no batch"):
        doctor(model, [])
    with pytest.raises(ValueError, match="num_batches"):
        doctor(model, [torch.randn(4, 2)], num_batches=0)
    assert doctor(model, [torch.randn(4, 2)] * 5, num_batches=2).batches_used == 2
