import pytest
import torch

from course.utils import (
    as_time,
    check_batch,
    check_positive_int,
    expand_like,
    fast_mode,
    pick,
    seed_everything,
)


@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 4, 4), (5,)])
def test_expand_like_broadcasts_per_sample(shape):
    x = torch.randn(shape)
    t = torch.arange(5.0)
    out = expand_like(t, x) * x
    for b in range(5):
        torch.testing.assert_close(out[b], t[b] * x[b])


def test_expand_like_rejects_wrong_batch():
    with pytest.raises(ValueError, match=r"expects t of shape \(4,\)"):
        expand_like(torch.zeros(3), torch.zeros(4, 2))


def test_as_time_accepts_scalars_and_rejects_out_of_range():
    x = torch.zeros(3, 2, dtype=torch.float64)
    t = as_time(0.5, x)
    assert t.shape == (3,) and t.dtype == torch.float64
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        as_time(1.5, x)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        as_time(torch.tensor([0.1, -0.2, 0.3]), x)
    with pytest.raises(ValueError, match="shape"):
        as_time(torch.zeros(2), x)


def test_validation_helpers():
    with pytest.raises(ValueError, match="expected n_steps >= 1; got -3"):
        check_positive_int(-3, "n_steps")
    with pytest.raises(ValueError, match="integer"):
        check_positive_int(2.5, "n_steps")
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        check_batch(torch.zeros(4, 3), trailing=(2,))
    with pytest.raises(ValueError, match="floating-point"):
        check_batch(torch.zeros(4, 2, dtype=torch.long))


def test_fast_mode_flag(monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    assert fast_mode() and pick(100, 10) == 10
    monkeypatch.setenv("COURSE_FAST", "0")
    assert not fast_mode() and pick(100, 10) == 100


def test_seed_everything_is_reproducible():
    g1 = seed_everything(7)
    a = torch.randn(3), torch.randn(3, generator=g1)
    g2 = seed_everything(7)
    b = torch.randn(3), torch.randn(3, generator=g2)
    torch.testing.assert_close(a, b)
