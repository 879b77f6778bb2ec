import pytest
import torch
from torch import nn

from course.nets import SinusoidalTimeEmbedding, TimeMLP
from course.training import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train


def _regression():
    """Fit y = 3 x with a 1-parameter model: a loss with a known minimum."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)

    def loss_fn(m, batch, generator):
        return (m(batch) - 3 * batch).pow(2).mean()

    return model, loss_fn, lambda n, generator=None: torch.randn(n, 1, generator=generator)


def test_training_converges_and_ema_follows():
    model, loss_fn, data = _regression()
    cfg = TrainConfig(steps=400, batch_size=64, lr=0.05, ema_decay=0.9, grad_clip=None)
    res = train(model, loss_fn, data, cfg, generator=torch.Generator().manual_seed(0))
    assert res.steps == 400 and len(res.losses) == 400
    assert abs(model.weight.item() - 3) < 1e-3
    assert abs(res.ema_model.weight.item() - 3) < 1e-2
    assert res.ema_model is not model and res.losses[-1] < 1e-4 < res.losses[0]


def test_ema_is_an_exponential_average():
    """With lr = 0 the weights never move, so the EMA equals them exactly."""
    model, loss_fn, data = _regression()
    nn.init.constant_(model.weight, 1.5)
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-12, ema_decay=0.5, cosine_decay=False)
    res = train(model, loss_fn, data, cfg)
    torch.testing.assert_close(res.ema_model.weight, model.weight)


def test_training_is_reproducible_and_calls_eval():
    runs = []
    for _ in range(2):
        model, loss_fn, data = _regression()
        calls = []
        cfg = TrainConfig(steps=30, batch_size=8, lr=0.01, eval_every=10)
        res = train(model, loss_fn, data, cfg, generator=torch.Generator().manual_seed(3),
                    eval_fn=lambda m, step, calls=calls: calls.append(step) or step)
        runs.append(res.losses)
        assert calls == [10, 20, 30] and [s for s, _ in res.evals] == [10, 20, 30]
    assert runs[0] == runs[1]


def test_time_limit_and_tensor_dataset():
    model, loss_fn, _ = _regression()
    dataset = torch.randn(100, 1)
    res = train(model, loss_fn, dataset, TrainConfig(steps=10_000, batch_size=8, time_limit=0.2))
    assert 0 < res.steps < 10_000


def test_bad_config_and_data():
    with pytest.raises(ValueError, match="steps >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(steps=1, ema_decay=1.0)
    model, loss_fn, _ = _regression()
    with pytest.raises(ValueError, match="tensor dataset or a sampler"):
        train(model, loss_fn, [1, 2, 3], TrainConfig(steps=1))


def test_diverging_loss_is_reported():
    model = nn.Linear(1, 1)
    with pytest.raises(FloatingPointError, match="the loss became nan"):
        train(model, lambda m, b, g: m(b).sum() * float("nan"), torch.randn(10, 1), TrainConfig(steps=3))


def test_checkpoint_round_trip_and_errors(tmp_path):
    net = TimeMLP(hidden=16, depth=1)
    path = save_checkpoint(tmp_path / "ck" / "mlp.pt", net, {"recipe": "toy", "steps": 3})
    assert [p.name for p in path.parent.iterdir()] == ["mlp.pt"]  # no temporary file left
    other = TimeMLP(hidden=16, depth=1)
    meta = load_checkpoint(path, other, rebuild="course train toy")
    assert meta == {"recipe": "toy", "steps": 3}
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match="missing; rebuild it with `course train toy`"):
        load_checkpoint(tmp_path / "nope.pt", other, rebuild="course train toy")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be loaded.*course train toy"):
        load_checkpoint(bad, other, rebuild="course train toy")
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_checkpoint(path, TimeMLP(hidden=8, depth=1))


def test_time_mlp_shapes_and_validation():
    net = TimeMLP(dim=2, hidden=32, depth=2)
    out = net(torch.randn(5, 2), torch.rand(5))
    assert out.shape == (5, 2)
    emb = SinusoidalTimeEmbedding(8)(torch.tensor([0.0, 1.0]))
    assert emb.shape == (2, 8) and torch.allclose(emb[0, 4:], torch.ones(4))  # cos(0) = 1
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        net(torch.randn(5, 3), torch.rand(5))
    with pytest.raises(ValueError, match=r"t of shape \(5,\)"):
        net(torch.randn(5, 2), torch.rand(4))
    with pytest.raises(ValueError, match="even"):
        SinusoidalTimeEmbedding(7)


def test_ema_update_follows_the_warmup_schedule():
    from course.training import ema_update

    avg, expected = [torch.zeros(3)], torch.zeros(3)
    update = ema_update(0.9, warmup=True)
    for n in range(1, 40):
        cur = torch.full((3,), float(n))
        update(avg, [cur], torch.tensor(n))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * cur
        torch.testing.assert_close(avg[0], expected)
    plain, expected = [torch.zeros(1)], torch.zeros(1)
    for n in range(1, 5):
        ema_update(0.9, warmup=False)(plain, [torch.ones(1)], n)
        expected = 0.9 * expected + 0.1
    torch.testing.assert_close(plain[0], expected)


def test_tuple_dataset_keeps_rows_together():
    x = torch.arange(50, dtype=torch.float32)[:, None]
    y = torch.arange(50) * 10
    seen = []

    def loss_fn(model, batch, g):
        xb, yb = batch
        seen.append(torch.equal(yb, xb[:, 0].long() * 10))
        return model(xb).pow(2).mean()

    train(nn.Linear(1, 1), loss_fn, (x, y), TrainConfig(steps=5, batch_size=8), generator=torch.Generator().manual_seed(0))
    assert seen == [True] * 5
    with pytest.raises(ValueError, match="one first dimension"):
        train(nn.Linear(1, 1), loss_fn, (x, y[:10]), TrainConfig(steps=1, batch_size=8))


def test_sampler_returning_a_tuple_keeps_labels_with_their_points():
    from course.toy_data import two_class_mixture

    data = two_class_mixture()
    seen = []

    def loss_fn(model, batch, g):
        xb, yb = batch
        nearest = torch.cdist(xb.double(), data.means).argmin(1)
        seen.append(torch.equal(data.labels[nearest], yb))
        return model(xb).pow(2).mean()

    train(nn.Linear(2, 2), loss_fn, data.sample_labelled, TrainConfig(steps=3, batch_size=64),
          generator=torch.Generator().manual_seed(0))
    assert seen == [True] * 3
