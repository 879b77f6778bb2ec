"""Chapter 12's recipes in fast mode: MAR on the latent tokens of the chapter-08 autoencoder (both
orders) and Diffusion Forcing / teacher forcing on simulated pendulum sequences, trained, measured,
saved and loaded back."""

import pytest
import torch

from course.autoregressive import MAR
from course.autoregressive_recipes import LatentMAR, mar_settings, pendulum_data
from course.diffusion_forcing import CausalDenoiser
from course.pretrained import load
from course.recipes import build_model, get_recipe, run_recipe


def test_the_recipes_build_on_the_shared_latent_space_and_the_pendulum():
    model = build_model(get_recipe("mnist_mar"))
    assert isinstance(model, LatentMAR) and (model.mar.num_tokens, model.mar.token_dim) == (49, 4)
    assert model.mar.order == "random" and build_model(get_recipe("mnist_mar_raster")).mar.causal
    assert mar_settings(get_recipe("mnist_mar"))["steps"] == 16
    assert mar_settings(get_recipe("mnist_mar_raster"))["steps"] == 49  # one token per step
    z = torch.randn(3, 4, 7, 7)
    assert torch.equal(model.latents(model.tokens(z)), z)
    assert isinstance(build_model(get_recipe("pendulum_df")), CausalDenoiser)
    assert get_recipe("pendulum_df").option("noise") == "independent"
    assert get_recipe("pendulum_tf").option("noise") == "teacher_forcing"
    with pytest.raises(ValueError, match="49 tokens of size 4"):
        LatentMAR(model.autoencoder, MAR(16, 4))


def test_pendulum_data_is_simulated_deterministically():
    train, test = pendulum_data("train", verbose=False), pendulum_data("test", verbose=False)
    assert train.images.shape == (6000, 16, 2) and test.images.shape == (200, 64, 2)
    assert torch.equal(pendulum_data("test", verbose=False).images, test.images)
    assert not torch.equal(train.images[:200, :16], test.images[:, :16])  # its own seed
    with pytest.raises(ValueError, match="split 'train' or 'test'"):
        pendulum_data("val")


def test_fast_runs_measure_save_and_load_back(tmp_path):
    run_recipe("mnist_classifier", folder=tmp_path, fast=True, progress=False)
    run_recipe("mnist_autoencoder", folder=tmp_path, fast=True, progress=False)
    for name in ("mnist_mar", "mnist_mar_raster"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
        assert m["ar_steps"] == (16 if name == "mnist_mar" else 49) and 0 <= m["class_accuracy"] <= 1
        assert m["mnist_fd"] > 0 and m["tokens_per_second"] > 0
        model = load(name, folder=tmp_path, allow_fast=True)
        images = model.sample(torch.tensor([3, 7]), steps=m["ar_steps"], head_steps=2,
                              generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    for name in ("pendulum_df", "pendulum_tf"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
        assert m["rollout_tokens"] == 64 and m["rollouts"] == 8
        for key in ("energy_error_in_horizon", "energy_error_last_quarter", "radius_error_in_horizon",
                    "distance_last_quarter", "tokens_per_second"):
            assert m[key] > 0 and m[key] == m[key], (key, m)
        assert isinstance(load(name, folder=tmp_path, allow_fast=True), CausalDenoiser)
