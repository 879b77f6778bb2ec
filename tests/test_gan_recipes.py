"""Chapter 11's recipes in fast mode: each trains, measures, saves and loads back; the
discriminator is trained inside the generator's loss; nothing trained sees the evaluation
classifier; the ablations differ from their full recipes only in the named weight."""

import torch

from course.gan import Generator
from course.pretrained import load
from course.recipes import get_recipe, run_recipe
from course.unet import UNet


def _options(name):
    return dict(get_recipe(name).options)


def test_ablations_differ_only_in_their_weight():
    full, ablation = _options("mnist_d2g"), _options("mnist_d2g_no_gan")
    assert full["gan_weight"] > 0 and ablation["gan_weight"] == 0
    assert get_recipe("mnist_d2g").steps == get_recipe("mnist_d2g_no_gan").steps
    assert _options("mnist_add")["adv_weight"] > 0 and _options("mnist_add_distill_only")["adv_weight"] == 0
    assert get_recipe("mnist_add").steps == get_recipe("mnist_add_distill_only").steps
    gan, dgan = get_recipe("mnist_gan"), get_recipe("mnist_diffusion_gan")
    assert (gan.steps, gan.batch_size, gan.lr) == (dgan.steps, dgan.batch_size, dgan.lr)
    assert _options("mnist_diffusion_gan")["diffusion"] and not _options("mnist_gan").get("diffusion", False)


def test_fast_runs_train_measure_save_and_load_back(tmp_path):
    for name in ("mnist_classifier", "mnist_noisy_classifier", "mnist_cfm_unet"):
        run_recipe(name, folder=tmp_path, fast=True, progress=False)
    for name in ("mnist_gan", "mnist_diffusion_gan"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
        assert len(m["class_shares"]) == 10 and abs(sum(m["class_shares"]) - 1) < 1e-3
        assert m["mnist_fd"] > 0 and m["training_log"]["step"][0] == 1
        assert isinstance(load(name, folder=tmp_path, allow_fast=True), Generator)
    assert "final_t_max" in m and 0 <= m["final_t_max"] <= 0.4
    for name in ("mnist_add", "mnist_add_distill_only", "mnist_ladd", "mnist_d2g", "mnist_d2g_no_gan"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
        assert 0 <= m["1_step"]["class_accuracy"] <= 1 and m["1_step"]["nfe"] == 1, name
        assert isinstance(load(name, folder=tmp_path, allow_fast=True), UNet)
        logged = set(m["training_log"])
        if name in ("mnist_add", "mnist_ladd"):
            assert {"d_loss", "adv", "distill"} <= logged
            assert m["4_steps"]["nfe"] == 4
        if name == "mnist_add_distill_only":
            assert "d_loss" not in logged
        if name.startswith("mnist_d2g"):
            assert m["pair_seconds"] > 0


def test_the_students_start_as_the_teacher(tmp_path):
    run_recipe("mnist_cfm_unet", folder=tmp_path, fast=True, progress=False)
    teacher = load("mnist_cfm_unet", folder=tmp_path, allow_fast=True)
    from course.gan_recipes import _prepare_student

    student = UNet(1, channels=get_recipe("mnist_add_distill_only").channels, num_classes=10, patch=2)
    _prepare_student(get_recipe("mnist_add_distill_only"), student, tmp_path, True)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values(),
                                                  strict=True))
