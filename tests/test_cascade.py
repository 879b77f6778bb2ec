"""Chapter 08's cascade: resampling, noise-conditioning augmentation, the SR loss, the U-Net's
conditioning image, the two-stage sampler (exact for a point-mass SR stage), and the recipe in fast mode."""

import pytest
import torch
from torch import nn

from course.cascade import Cascade, augment_low_res, downsample, sample_cascade, sr_loss, upsample
from course.pretrained import load
from course.recipes import get_recipe, run_recipe
from course.unet import UNet


def test_down_and_upsampling():
    low = torch.randn(3, 1, 14, 14, dtype=torch.float64)
    nearest = low.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(downsample(nearest), low, rtol=0, atol=1e-15)  # the mean of each 2x2 block
    const = torch.full((2, 1, 14, 14), 0.3, dtype=torch.float64)
    torch.testing.assert_close(upsample(const, (28, 28)), torch.full((2, 1, 28, 28), 0.3, dtype=torch.float64))
    assert downsample(torch.randn(2, 3, 32, 32)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible by 2"):
        downsample(torch.randn(2, 1, 15, 14))


def test_noise_conditioning_augmentation():
    low = torch.randn(4, 1, 14, 14, dtype=torch.float64)
    assert torch.equal(augment_low_res(low, 0.0), low)
    eps = torch.randn(low.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(augment_low_res(low, 1.0, generator=torch.Generator().manual_seed(3)), eps)
    level = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    out = augment_low_res(low, level, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, (1 - level[:, None, None, None]) * low + level[:, None, None, None] * eps)
    big = torch.full((20000, 1, 2, 2), 0.8, dtype=torch.float64)
    aug = augment_low_res(big, 0.3, generator=torch.Generator().manual_seed(0))
    # mean (1 - s) 0.8 = 0.56 and std s = 0.3; standard errors 0.3 / sqrt(80000) = 0.001
    assert abs(float(aug.mean()) - 0.56) < 0.005 and abs(float(aug.std()) - 0.3) < 0.005
    with pytest.raises(ValueError, match=r"levels in \[0, 1\]"):
        augment_low_res(low, 1.5)
    with pytest.raises(ValueError, match=r"one per image \(4,\)"):
        augment_low_res(low, torch.zeros(3))


class Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = {}

    def forward(self, x, t, **cond):
        self.seen = cond
        return self.w * x


def test_sr_loss_conditions_on_the_augmented_low_res_image_and_has_a_gradient_path():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    spy = Spy()
    loss = sr_loss(spy, x, max_aug=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spy.seen["aug_level"], torch.zeros(6))
    torch.testing.assert_close(spy.seen["low_res"], upsample(downsample(x), (28, 28)))  # no augmentation at 0
    loss.backward()
    assert spy.w.grad is not None and spy.w.grad != 0
    sr_loss(spy, x, max_aug=0.5, generator=torch.Generator().manual_seed(0))
    s = spy.seen["aug_level"]
    assert s.shape == (6,) and (s >= 0).all() and (s <= 0.5).all() and s.max() > 0
    assert not torch.allclose(spy.seen["low_res"], upsample(downsample(x), (28, 28)))
    with pytest.raises(ValueError, match="max_aug"):
        sr_loss(spy, x, max_aug=2.0)


def test_unet_conditioning_image_and_level():
    sr = UNet(1, (8, 16, 16), cond_channels=1, aug_level=True, patch=2)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert sr(x, t, low_res=torch.randn(2, 1, 28, 28), aug_level=torch.rand(2)).shape == x.shape
    with pytest.raises(ValueError, match=r"expected low_res of shape \(2, 1, 28, 28\)"):
        sr(x, t, low_res=torch.randn(2, 1, 14, 14), aug_level=torch.rand(2))
    with pytest.raises(ValueError, match=r"expected aug_level of shape \(2,\)"):
        sr(x, t, low_res=torch.randn(2, 1, 28, 28))
    plain = UNet(1, (8, 16, 16))
    with pytest.raises(ValueError, match="takes no conditioning image"):
        plain(x, t, low_res=x)
    assert not any(k.startswith("aug") for k in plain.state_dict())  # the pixel models' checkpoints are unchanged
    assert plain.stem[1].weight.shape[1] == 1 and sr.stem[1].weight.shape[1] == 8


class PointMassSR(nn.Module):
    """The exact velocity when the 28x28 image is the conditioning image itself: (x_t - low_res) / t."""

    def forward(self, x, t, low_res, aug_level):
        return (x - low_res) / t[:, None, None, None]


def test_sample_cascade_runs_both_stages_and_is_exact_for_a_point_mass_sr_stage():
    base = UNet(1, (8, 16, 16), num_classes=10, patch=2)
    cascade = Cascade(base, PointMassSR())
    labels = torch.tensor([0, 1, 2, 3])
    images, low = sample_cascade(cascade, labels, nfe_base=2, nfe_sr=3, aug_level=0.0,
                                 generator=torch.Generator().manual_seed(0), return_low=True)
    assert images.shape == (4, 1, 28, 28) and low.shape == (4, 1, 14, 14)
    torch.testing.assert_close(images, upsample(low, (28, 28)), rtol=0, atol=1e-5)  # straight paths: Euler is exact
    with pytest.raises(TypeError, match="sample_cascade"):
        cascade(images, torch.rand(4))


def test_sample_cascade_super_resolves_given_low_res_images_without_the_base_model():
    class NoBase(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the base model must not run when low-res images are given")

    cascade = Cascade(NoBase(), PointMassSR())
    low = torch.rand(3, 1, 14, 14, generator=torch.Generator().manual_seed(1)) * 2 - 1
    images = sample_cascade(cascade, torch.tensor([4, 5, 6]), nfe_sr=3, aug_level=0.0, low=low,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, upsample(low, (28, 28)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected low of shape \(3, 1, 14, 14\)"):
        sample_cascade(cascade, torch.tensor([4, 5, 6]), low=low[:2])


def test_cascade_recipe_in_fast_mode(tmp_path):
    recipe = get_recipe("mnist_sr_cascade")
    assert recipe.option("max_aug") > 0 and recipe.option("sample_aug") <= recipe.option("max_aug")
    run_recipe("mnist_classifier", folder=tmp_path, fast=True, progress=False)
    m = run_recipe("mnist_sr_cascade", folder=tmp_path, fast=True, progress=False).metrics
    assert m["nfe"] == 2 * recipe.eval_nfe + recipe.option("sr_nfe") and m["mnist_fd"] > 0 and m["samples_per_second"] > 0
    model = load("mnist_sr_cascade", folder=tmp_path, allow_fast=True)
    assert isinstance(model, Cascade) and model.sr.cond_channels == 1
    assert sample_cascade(model, torch.tensor([5, 6]), nfe_base=2, nfe_sr=2).shape == (2, 1, 28, 28)
