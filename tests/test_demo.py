"""`bnorm demo`: the article's example, end to end on a reduced setting."""

import json

from torch import nn

import bnorm
from bnorm import demo
from bnorm.cli import main


def test_models_put_batch_norm_where_the_variant_says():
    kinds = {v: [type(m) for m in demo.build_model(demo.VARIANTS[v])] for v in demo.VARIANTS}
    assert kinds["no BN"] == [nn.Linear, nn.ReLU, nn.Linear]
    assert kinds["BN after ReLU"] == [nn.Linear, nn.ReLU, bnorm.BatchNorm1d, nn.Linear]
    assert kinds["BN before ReLU"] == [nn.Linear, bnorm.BatchNorm1d, nn.ReLU, nn.Linear]
    bn = demo.build_model("before")[1]
    assert abs(bn.momentum - 0.01) < 1e-12 and bn.eps == 1e-3  # Keras' defaults, converted


def test_data_is_the_articles():
    xtr, ytr, xte, _yte = demo.load_circles()
    assert xtr.shape == xte.shape == (500, 2)
    assert set(ytr.unique().tolist()) == {0.0, 1.0}
    assert 200 < ytr.sum() < 300  # the two circles are balanced


def test_training_learns_something():
    history = demo.train_one("BN after ReLU", seed=0, epochs=40)
    assert len(history.test_acc) == 40
    assert history.test_acc[0] < 0.6  # starts near chance (0.5) ...
    assert max(history.test_acc) > 0.75  # ... and learns the circles


def test_first_epoch_at_target():
    h = demo.RunHistory("x", 0, train_acc=[0.5] * 4, test_acc=[0.5, 0.79, 0.8, 0.9])
    assert h.first_epoch_at(0.8) == 3
    assert h.first_epoch_at(0.95) is None


def test_cli_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--seeds", "2", "--epochs", "3", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for variant in demo.VARIANTS:
        assert f"| {variant} |" in text
    assert str(out / "curves.png") in text
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 3 * 2 and all(len(r["test_acc"]) == 3 for r in runs)


def test_runs_are_reproducible():
    a = demo.train_one("BN before ReLU", seed=3, epochs=2)
    b = demo.train_one("BN before ReLU", seed=3, epochs=2)
    assert a.test_acc == b.test_acc


def test_demo_trains_on_one_thread_and_restores_the_count(tmp_path, monkeypatch, capsys):
    """The demo's networks are tiny: it trains on one torch thread (a busy second core stalls
    every step), and gives the caller its thread count back."""
    import torch

    seen = []
    real = demo.run_demo

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "run_demo", spy)
    before = torch.get_num_threads()
    argv = ["demo", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert seen == [1]
    assert torch.get_num_threads() == before
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("bnorm demo: 3 variants x 1 seed(s) x 1 epochs")
