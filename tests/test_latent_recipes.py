"""Chapter 08's recipes in fast mode: the autoencoder (registered with its options, trains, measures its
reconstructions, stores the latent scale with the checkpoint, loads back), the latent generator on its
encoded digits, and the CIFAR-10 variants end to end on a fake CIFAR folder."""

import pickle

import numpy as np
import pytest
import torch

from course.autoencoder import KLAutoencoder
from course.latent import LatentDiffusion
from course.pretrained import CheckpointError, load
from course.recipes import (
    KINDS,
    RECIPES,
    Recipe,
    build_model,
    get_recipe,
    run_recipe,
    sample_classes,
)


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


# ---- the latent generator -------------------------------------------------------------------------
def test_latent_recipe_builds_a_latent_model_on_its_autoencoder():
    recipe = get_recipe("mnist_latent_cfm")
    assert recipe.kind == "latent_cfm" and recipe.option("autoencoder") == "mnist_autoencoder"
    model = build_model(recipe)
    assert isinstance(model, LatentDiffusion) and model.latent_shape == (4, 7, 7) and model.num_classes == 10
    assert model.denoiser.in_channels == 4
    cifar = build_model(get_recipe("cifar10_latent_cfm"))
    assert cifar.latent_shape == (8, 8, 8) and cifar.image_shape == (3, 32, 32)
    assert build_model(get_recipe("cifar10_classifier")).in_channels == 3


def test_latent_recipe_refuses_a_wrong_autoencoder():
    with pytest.raises(ValueError, match="names 'mnist_classifier' as its autoencoder; expected a recipe of kind"):
        build_model(Recipe("x", "latent_cfm", steps=1, batch_size=1, lr=1.0, options=(("autoencoder", "mnist_classifier"),)))
    with pytest.raises(ValueError, match="trains on cifar10 but its autoencoder 'mnist_autoencoder' on mnist"):
        build_model(Recipe("x", "latent_cfm", steps=1, batch_size=1, lr=1.0, data="cifar10",
                           options=(("autoencoder", "mnist_autoencoder"),)))
    with pytest.raises(ValueError, match="unknown data 'svhn'.*mnist, cifar10"):
        Recipe("x", "latent_cfm", steps=1, batch_size=1, lr=1.0, data="svhn")


def test_latent_recipe_without_its_autoencoder_says_how_to_build_it(tmp_path):
    with pytest.raises(CheckpointError, match="course train mnist_autoencoder"):
        run_recipe("mnist_latent_cfm", folder=tmp_path, fast=True, progress=False)


def test_fast_latent_run_trains_on_encoded_digits_and_loads_back_with_its_autoencoder(tmp_path):
    run_recipe("mnist_classifier", folder=tmp_path, fast=True, progress=False)
    ae = run_recipe("mnist_autoencoder", folder=tmp_path, fast=True, progress=False).model
    result = run_recipe("mnist_latent_cfm", folder=tmp_path, fast=True, progress=False)
    m = result.metrics
    assert m["nfe"] == 40 and m["samples_per_second"] > 0 and 0 <= m["class_accuracy"] <= 1
    assert m["mnist_fd"] > 0 and m["mnist_fd_floor"] > 0 and m["mnist_fd_of_reconstructions"] > 0
    assert m["encode_seconds"] >= 0
    model = load("mnist_latent_cfm", folder=tmp_path, allow_fast=True)
    assert isinstance(model, LatentDiffusion)
    for name, value in ae.state_dict().items():  # the checkpoint carries the autoencoder it was trained on
        torch.testing.assert_close(model.autoencoder.state_dict()[name], value, rtol=0, atol=0)
    z = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(z, torch.rand(2), y=torch.tensor([1, 10])).shape, z.shape)
        assert sample_classes(model, torch.tensor([3, 4]), nfe=2).shape == (2, 1, 28, 28)


def _fake_cifar(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 120)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": (np.arange(n) % 10).tolist()}, f)


def test_cifar_recipes_run_end_to_end_on_a_fake_cifar_folder(tmp_path, monkeypatch):
    _fake_cifar(tmp_path / "data")
    monkeypatch.setenv("COURSE_DATA", str(tmp_path / "data"))
    folder = tmp_path / "ckpt"
    acc = run_recipe("cifar10_classifier", folder=folder, fast=True, progress=False).metrics["held_out_accuracy"]
    assert 0 <= acc <= 1
    m = run_recipe("cifar10_autoencoder", folder=folder, fast=True, progress=False).metrics
    assert m["latent_shape"] == [8, 8, 8] and m["held_out"] == 120 and m["psnr_db"] > 0
    m = run_recipe("cifar10_latent_cfm", folder=folder, fast=True, progress=False).metrics
    assert m["samples_per_second"] > 0 and m["cifar10_fd"] > 0 and m["cifar10_fd_of_reconstructions"] > 0
    model = load("cifar10_latent_cfm", folder=folder, allow_fast=True)
    with torch.no_grad():
        assert sample_classes(model, torch.tensor([0, 9]), nfe=2).shape == (2, 3, 32, 32)
