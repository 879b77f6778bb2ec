import math

import pytest
import torch

from course.metrics import (
    energy_distance,
    mode_weight_error,
    mode_weights,
    noise_floor,
    sliced_wasserstein,
)
from course.toy_data import GaussianMixture, eight_gaussians


def test_sliced_wasserstein_of_a_shift_in_one_dimension(gen):
    """In 1-D the only direction is +-1: SW2 between x and x + c is exactly |c|."""
    x = torch.randn(1000, 1, generator=gen, dtype=torch.float64)
    assert sliced_wasserstein(x, x) == 0.0
    assert abs(sliced_wasserstein(x, x + 0.3, n_projections=8) - 0.3) < 1e-12


def test_sliced_wasserstein_of_a_shift_in_two_dimensions(gen):
    """SW2^2 of a shift c e_1 in 2-D is c^2 E[u_1^2] = c^2 / 2 over uniform directions."""
    x = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    sw = sliced_wasserstein(x, x + torch.tensor([1.0, 0.0], dtype=torch.float64), n_projections=20_000)
    assert abs(sw - math.sqrt(0.5)) < 0.01


def test_energy_distance_matches_closed_form_for_shifted_gaussians(gen):
    """For X ~ N(0, 1), Y ~ N(mu, 1): E|X - Y| = 2 phi(mu/sqrt2) sqrt2 + mu (1 - 2 Phi(-mu/sqrt2)),
    E|X - X'| = 2 / sqrt(pi). The V-statistic adds (1/n + 1/m) E|X - X'| on average."""
    mu, n = 1.0, 4000
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    y = mu + torch.randn(n, 1, generator=gen, dtype=torch.float64)
    s = math.sqrt(2)
    phi = math.exp(-(mu / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(-mu / s / math.sqrt(2)))
    e_xy = s * 2 * phi + mu * (1 - 2 * cdf)
    e_xx = 2 / math.sqrt(math.pi)
    expected = 2 * e_xy - 2 * e_xx + 2 * e_xx / n
    assert abs(energy_distance(x, y) - expected) < 0.03 * expected
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_noise_floor_matches_its_expectation():
    """Between two independent sets of n true samples the V-statistic averages (2/n) E|X - X'|."""
    data, n = eight_gaussians(), 1000
    gen = torch.Generator().manual_seed(0)
    floor = noise_floor(energy_distance, lambda k: data.sample(k, generator=gen), n, repeats=40)
    big = data.sample(4000, generator=gen).double()
    e_xx = torch.cdist(big, big).sum().item() / (4000 * 3999)
    assert abs(floor.mean - 2 * e_xx / n) < 4 * floor.std / math.sqrt(floor.repeats)


def test_distances_grow_with_a_real_difference(gen):
    """Energy distance sees a 3x blur of every mode; sliced W2 barely does (its floor is set by
    the random number of samples per mode), but it sees a larger circle."""
    data, n = eight_gaussians(), 6_000
    a, b = data.sample(n, generator=gen), data.sample(n, generator=gen)
    blurred = eight_gaussians(std=0.3).sample(n, generator=gen)
    wider = eight_gaussians(radius=2.5).sample(n, generator=gen)
    assert energy_distance(a, blurred) > 3 * energy_distance(a, b)
    assert sliced_wasserstein(a, wider) > 2 * sliced_wasserstein(a, b)


def test_mode_weights_and_error(gen):
    data = GaussianMixture([[-3.0, 0.0], [3.0, 0.0]], 0.2, weights=[0.3, 0.7])
    x, k = data.sample_components(10_000, generator=gen)
    torch.testing.assert_close(mode_weights(x, data), torch.bincount(k).double() / 10_000)
    lopsided = torch.cat([x[k == 0], x[k == 0]])[:2000]  # every sample in mode 0
    assert mode_weight_error(lopsided, data) == pytest.approx(0.7)


def test_bad_inputs():
    with pytest.raises(ValueError, match="as many samples"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="repeats >= 1"):
        noise_floor(energy_distance, lambda k: torch.zeros(k, 2), 10, repeats=0)


def test_mmd_floor_is_exact_for_mixtures():
    """The closed-form E k(X, X') matches Monte Carlo, and the MMD between independent true sets
    averages (2/n)(1 - E k) within 4 standard errors."""
    from course.metrics import expected_rbf_kernel, mmd_floor, mmd_rbf

    data, gen = eight_gaussians(), torch.Generator().manual_seed(0)
    a, b = data.sample(4000, generator=gen).double(), data.sample(4000, generator=gen).double()
    mc = torch.exp(-(a - b).pow(2).sum(1) / (2 * 0.1**2))
    assert abs(mc.mean().item() - expected_rbf_kernel(data, 0.1)) < 4 * mc.std().item() / math.sqrt(4000)
    values = torch.tensor([mmd_rbf(data.sample(500, generator=gen), data.sample(500, generator=gen))
                           for _ in range(40)])
    assert abs(values.mean().item() - mmd_floor(data, 500)) < 4 * values.std().item() / math.sqrt(40)
    assert mmd_rbf(a, a) == pytest.approx(0.0, abs=1e-12)


def test_sample_quality_of_true_samples_is_at_the_floor():
    """True samples in place of generated ones: both ratios near 1 (4 standard errors); a 30%
    wider std in every mode is far above the MMD floor."""
    from course.metrics import make_reference, sample_quality

    data, gen = eight_gaussians(), torch.Generator().manual_seed(0)
    ref = make_reference(data, 1000, repeats=8, generator=gen)
    q = sample_quality(data.sample(8000, generator=gen), ref)
    assert abs(q.mmd_ratio - 1) < 4 * q.mmd_ratio_se
    assert abs(q.sw_ratio - 1) < 4 * q.sw_ratio_se
    blurred = sample_quality(eight_gaussians(std=0.13).sample(8000, generator=gen), ref)
    assert blurred.mmd_ratio - 1 > 4 * blurred.mmd_ratio_se
    with pytest.raises(ValueError, match="expected 1000 samples, or 8 sets"):
        sample_quality(data.sample(1500, generator=gen), ref)


def test_sample_quality_reuses_kernels_without_changing_the_mmd():
    """The cached self-kernels give exactly the MMD of mmd_rbf against each reference set, for one set
    compared with all references and for stacked sets, in float32 and float64."""
    from course.metrics import make_reference, mmd_rbf, sample_quality

    data = eight_gaussians()
    ref = make_reference(data, 300, generator=torch.Generator().manual_seed(1))
    assert ref.self_kernels is not None and len(ref.self_kernels) == len(ref.samples)
    for dtype in (torch.float32, torch.float64):
        x = data.sample(300, generator=torch.Generator().manual_seed(2)).to(dtype) * 1.1
        expected = sum(mmd_rbf(x, r) for r in ref.samples) / len(ref.samples)
        assert sample_quality(x, ref).mmd == pytest.approx(expected, rel=1e-12, abs=1e-15)
        stacked = data.sample(300 * len(ref.samples), generator=torch.Generator().manual_seed(3)).to(dtype)
        expected = sum(mmd_rbf(a, r) for a, r in zip(stacked.split(300), ref.samples, strict=True)) / len(ref.samples)
        assert sample_quality(stacked, ref).mmd == pytest.approx(expected, rel=1e-12, abs=1e-15)
