"""Chapter 08's autoencoder recipe in fast mode: registered with its options, trains, measures its
reconstructions, stores the latent scale with the checkpoint, and loads back."""

import pytest
import torch

from course.autoencoder import KLAutoencoder
from course.pretrained import load
from course.recipes import KINDS, RECIPES, Recipe, build_model, get_recipe, run_recipe


def test_the_recipe_and_its_options():
    recipe = get_recipe("mnist_autoencoder")
    assert recipe.kind == "autoencoder" and "autoencoder" in KINDS and "mnist_autoencoder" in RECIPES
    assert recipe.option("latent_channels") == 4 and recipe.option("beta") == pytest.approx(1e-3)
    model = build_model(recipe)
    assert isinstance(model, KLAutoencoder) and model.latent_shape == (4, 7, 7)
    assert torch.Size(model.latent_shape).numel() <= 784 // 4  # a latent of at most 1/4 of the pixels


def test_unknown_options_are_refused_by_name():
    recipe = get_recipe("mnist_autoencoder")
    with pytest.raises(ValueError, match="no option 'nope'.*latent_channels"):
        recipe.option("nope")
    assert recipe.option("nope", 7) == 7
    with pytest.raises(ValueError, match="options as"):
        Recipe("x", "autoencoder", steps=1, batch_size=1, lr=1.0, options={"beta": 1.0})


def test_fast_run_stores_the_latent_scale_and_loads_back(tmp_path):
    run_recipe("mnist_classifier", folder=tmp_path, fast=True, progress=False)
    result = run_recipe("mnist_autoencoder", folder=tmp_path, fast=True, progress=False)
    m = result.metrics
    assert m["latent_shape"] == [4, 7, 7] and m["held_out"] == 1000
    assert m["reconstruction_mse"] > 0 and m["latent_scale"] > 0 and m["kl_per_latent_dim"] >= 0
    assert 0 <= m["accuracy_on_reconstructions"] <= 1 and 0 <= m["accuracy_on_originals"] <= 1
    ae = load("mnist_autoencoder", folder=tmp_path, allow_fast=True)
    assert isinstance(ae, KLAutoencoder)
    assert float(ae.latent_scale) == pytest.approx(m["latent_scale"]) and float(ae.latent_scale) != 1.0
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ae(x), result.model(x))
