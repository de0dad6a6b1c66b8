"""bnorm.RecurrentBatchNorm1d, BNLSTMCell and BNLSTM against the NumPy reference."""

import copy

import numpy as np
import pytest
import torch
from helpers import assert_close, np64
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnorm
from bnorm import reference as ref
from bnorm import reference_remedies as rr


def test_recurrent_bn_keeps_statistics_per_step():
    bn = bnorm.RecurrentBatchNorm1d(3, max_steps=2, dtype=torch.float64)
    assert torch.equal(bn.weight, torch.full((3,), 0.1, dtype=torch.float64))
    assert {k: tuple(v.shape) for k, v in bn.state_dict().items()} == {
        "weight": (3,),
        "bias": (3,),
        "running_mean": (2, 3),
        "running_var": (2, 3),
        "num_batches_tracked": (2,),
    }
    rm = np.zeros((2, 3))
    rv = np.ones((2, 3))
    for t in range(4):  # steps 2 and 3 share step 1's statistics
        x = torch.randn(5, 3, dtype=torch.float64) * (t + 1) + t
        y = bn(x, t)
        expected, cache = ref.forward_train(np64(x), np64(bn.weight), np64(bn.bias))
        assert_close(y, expected, atol=1e-12, rtol=1e-12)
        s = min(t, 1)
        rm[s], rv[s], _ = ref.update_running_stats(rm[s], rv[s], cache.stats, momentum=0.1)
        assert_close(bn.running_mean, rm, atol=1e-12, rtol=1e-12)
        assert_close(bn.running_var, rv, atol=1e-12, rtol=1e-12)
    assert bn.num_batches_tracked.tolist() == [1, 3]
    bn.eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    for t in (0, 1, 7):
        s = min(t, 1)
        expected = ref.forward_eval(np64(x), rm[s], rv[s], np64(bn.weight), np64(bn.bias))
        assert_close(bn(x, t), expected, atol=1e-12, rtol=1e-12)


def test_recurrent_bn_errors_and_batch_of_one():
    bn = bnorm.RecurrentBatchNorm1d(3, max_steps=2)
    with pytest.raises(ValueError, match=r"RecurrentBatchNorm1d\(3\): the time step t must be"):
        bn(torch.randn(4, 3), -1)
    with pytest.raises(ValueError, match=r"RecurrentBatchNorm1d\(3\): expected 2D input"):
        bn(torch.randn(4, 3, 2), 0)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        bn(torch.randn(1, 3), 0)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        bnorm.RecurrentBatchNorm1d(3, max_steps=0)
    assert bn.num_batches_tracked.tolist() == [0, 0]
    lenient = bnorm.RecurrentBatchNorm1d(3, max_steps=2, small_batch="running", gamma_init=1.0)
    x = torch.randn(1, 3)
    assert_close(lenient(x, 1), x, atol=1e-5, rtol=1e-5)  # running stats 0/1, γ = 1
    assert lenient.num_batches_tracked.tolist() == [0, 0]


def _running_of(cell):
    return {
        k: {"mean": np64(bn.running_mean), "var": np64(bn.running_var)}
        for k, bn in (("x", cell.bn_ih), ("h", cell.bn_hh), ("c", cell.bn_c))
    }


def _reference(lstm, x, lengths, training=True):
    cell = lstm.cell
    running = _running_of(cell)
    out, h, c = rr.bnlstm_forward(
        np64(x),
        np.asarray(lengths),
        np64(cell.weight_ih),
        np64(cell.weight_hh),
        np64(cell.bias),
        (np64(cell.bn_ih.weight), np64(cell.bn_hh.weight), np64(cell.bn_c.weight)),
        np64(cell.bn_c.bias),
        lstm.max_steps,
        running,
        momentum=0.1,
        training=training,
    )
    return out, h, c, running


def _lstm(**kw):
    lstm = bnorm.BNLSTM(3, 4, max_steps=4, dtype=torch.float64, **kw)
    with torch.no_grad():  # non-trivial γ and β
        for bn in (lstm.cell.bn_ih, lstm.cell.bn_hh, lstm.cell.bn_c):
            bn.weight.uniform_(0.1, 1.0)
        lstm.cell.bn_c.bias.uniform_(-0.5, 0.5)
    return lstm


def _assert_matches(lstm, out, state, expected):
    out_ref, h_ref, c_ref, running = expected
    assert_close(out, out_ref, atol=1e-12, rtol=1e-10, what="output")
    assert_close(state[0][0], h_ref, atol=1e-12, rtol=1e-10, what="h_n")
    assert_close(state[1][0], c_ref, atol=1e-12, rtol=1e-10, what="c_n")
    for k, bn in (("x", lstm.cell.bn_ih), ("h", lstm.cell.bn_hh), ("c", lstm.cell.bn_c)):
        assert_close(bn.running_mean, running[k]["mean"], atol=1e-12, rtol=1e-10, what=k)
        assert_close(bn.running_var, running[k]["var"], atol=1e-12, rtol=1e-10, what=k)


# lengths with a step where one sequence runs alone (t = 4, 5), steps beyond max_steps = 4,
# and an unsorted batch
LENGTHS = [3, 6, 1, 4, 3]


def test_bnlstm_padded_matches_reference_and_ignores_padding():
    lstm = _lstm()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    expected = _reference(lstm, x, LENGTHS)
    garbage = x.clone()
    for b, n in enumerate(LENGTHS):
        garbage[n:, b] = 1e6  # padding must never enter the statistics or the outputs
    out, state = lstm(garbage, lengths=LENGTHS)
    _assert_matches(lstm, out, state, expected)
    lstm.eval()
    expected = _reference(lstm, x, LENGTHS, training=False)
    out, state = lstm(x, lengths=torch.tensor(LENGTHS))
    _assert_matches(lstm, out, state, expected)


def test_bnlstm_packed_equals_padded_and_batch_first():
    a, b, c = _lstm(), _lstm(), _lstm(batch_first=True)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    out_a, (h_a, c_a) = a(x, lengths=LENGTHS)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    out_b, (h_b, c_b) = b(packed)
    reference_packed = pack_padded_sequence(out_a, torch.tensor(LENGTHS), enforce_sorted=False)
    assert torch.equal(out_b.batch_sizes, packed.batch_sizes)
    assert torch.equal(out_b.sorted_indices, packed.sorted_indices)
    assert_close(out_b.data, reference_packed.data, atol=1e-14, rtol=1e-12)
    padded, lens = pad_packed_sequence(out_b)
    assert lens.tolist() == LENGTHS
    assert_close(padded, out_a, atol=1e-14, rtol=1e-12)
    assert_close(h_b, h_a, atol=1e-14, rtol=1e-12)
    assert_close(c_b, c_a, atol=1e-14, rtol=1e-12)
    out_c, (h_c, _) = c(x.transpose(0, 1), lengths=LENGTHS)
    assert_close(out_c.transpose(0, 1), out_a, atol=1e-14, rtol=1e-12)
    assert_close(h_c, h_a, atol=1e-14, rtol=1e-12)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_bnlstm_gradcheck_and_initial_state():
    lstm = _lstm(momentum=0.0)  # momentum 0: every call sees the same running statistics
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, w):
        args = (x, (h0, c0))
        out, (h, c) = torch.func.functional_call(
            lstm, {"cell.weight_hh": w}, args, {"lengths": [4, 2, 3]}
        )
        return out, h, c

    w = lstm.cell.weight_hh.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, h0, c0, w))


def test_gamma_init_and_plain_lstm_cell_shapes():
    lstm = bnorm.BNLSTM(3, 5, max_steps=2, gamma_init=1.0)
    assert torch.equal(lstm.cell.bn_c.weight, torch.ones(5))
    assert lstm.cell.bn_ih.bias is None and lstm.cell.bn_hh.bias is None
    assert torch.equal(lstm.cell.bias[5:10], torch.ones(5))
    out, (h, c) = lstm(torch.randn(7, 2, 3))
    assert out.shape == (7, 2, 5) and h.shape == c.shape == (1, 2, 5)
    assert_close(out[-1], h[0], atol=0, rtol=0)
    cell = bnorm.BNLSTMCell(3, 5, max_steps=2)
    h1, c1 = cell(torch.randn(4, 3))
    assert h1.shape == c1.shape == (4, 5)


def test_bnlstm_errors():
    lstm = bnorm.BNLSTM(3, 4, max_steps=2)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        lstm(torch.randn(5, 2, 3), lengths=[6, 2])
    with pytest.raises(ValueError, match="expected 2 lengths"):
        lstm(torch.randn(5, 2, 3), lengths=[5])
    with pytest.raises(ValueError, match="expected input size 3, got 2"):
        lstm(torch.randn(5, 2, 2))
    with pytest.raises(ValueError, match=r"expected h_0 of shape \(1, 2, 4\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(1, 2, 4)))


def test_precise_bn_sets_per_step_statistics():
    lstm = _lstm()
    batches = [torch.randn(5, n, 3, dtype=torch.float64) + n for n in (3, 4)]
    # what each batch norm receives at each step, in a train-mode pass of an identical twin
    twin = copy.deepcopy(lstm)
    seen = {}
    for bn in (twin.cell.bn_ih, twin.cell.bn_hh, twin.cell.bn_c):
        bn.momentum = 0.0
        bn.register_forward_pre_hook(
            lambda m, a: seen.setdefault((m, m.step_index(a[1])), []).append(np64(a[0]))
        )
    with torch.no_grad():
        for x in batches:
            twin(x)
    bnorm.precise_bn(lstm, batches)
    for mine, theirs in zip(
        (lstm.cell.bn_ih, lstm.cell.bn_hh, lstm.cell.bn_c),
        (twin.cell.bn_ih, twin.cell.bn_hh, twin.cell.bn_c),
        strict=True,
    ):
        for s in range(lstm.max_steps):
            a = np.concatenate(seen[(theirs, s)])
            assert_close(mine.running_mean[s], a.mean(0), atol=1e-10, rtol=1e-10)
            assert_close(mine.running_var[s], a.var(0, ddof=1), atol=1e-10, rtol=1e-10)
        assert mine.num_batches_tracked.tolist() == [0] * lstm.max_steps


@given(
    lengths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    max_steps=st.integers(1, 6),
)
def test_hypothesis_lengths_against_reference(lengths, max_steps):
    lstm = bnorm.BNLSTM(2, 3, max_steps=max_steps, dtype=torch.float64)
    x = torch.randn(max(lengths), len(lengths), 2, dtype=torch.float64)
    expected = _reference(lstm, x, lengths)
    out, state = lstm(x, lengths=lengths)
    _assert_matches(lstm, out, state, expected)
