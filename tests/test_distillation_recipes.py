"""Chapter 07's recipes in fast mode: the registry knows them, each student starts exactly where the
method says (the CD student as the teacher's one-step Euler jump of the guided velocity, the PD
student as its teacher), the ladder chains and accumulates its training time, and the
checkpoints load back."""

import pytest
import torch

from course.consistency import sample_consistency
from course.distillation_recipes import T_MIN, _prepare_cd, _prepare_pd, teacher_velocity
from course.pretrained import load
from course.recipes import KINDS, PATH, RECIPES, build_model, get_recipe, run_recipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ch07")
    for name in ("mnist_classifier", "mnist_cfm_unet"):
        run_recipe(name, folder=folder, fast=True, progress=False)
    return folder


def test_registry_lists_the_ladder_in_order():
    assert {"consistency_student", "pd_student", "meanflow_student"} <= set(KINDS)
    chain, name = [], "mnist_pd_1"
    while name.startswith("mnist_pd_"):
        chain.append(RECIPES[name].student_steps)
        name = RECIPES[name].teacher
    assert chain == [1, 2, 4, 8, 16] and name == "mnist_cfm_unet"


def test_cd_student_starts_as_the_teachers_euler_jump_of_the_guided_velocity(folder):
    recipe = get_recipe("mnist_cd_student")
    model = build_model(recipe)
    context = _prepare_cd(recipe, model, folder, True)
    teacher = load("mnist_cfm_unet", folder=folder, allow_fast=True)
    guided = teacher_velocity(recipe, teacher)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        for t in (1.0, 0.3):
            tt = torch.full((4,), t)
            torch.testing.assert_close(model(x, tt, y=y), x - (t - T_MIN) * teacher(x, tt, y=y))
        assert torch.equal(model(x, torch.full((4,), T_MIN), y=y), x)
        # the teacher the loss distils is the guided one: (1 + w) cond - w uncond
        tt = torch.full((4,), 0.5)
        w = recipe.eval_w
        torch.testing.assert_close(context["velocity"](x, tt, y=y),
                                   (1 + w) * teacher(x, tt, y=y) - w * teacher(x, tt, y=torch.full_like(y, 10)))
        torch.testing.assert_close(guided(x, tt, y=y), context["velocity"](x, tt, y=y))


def test_cd_student_recipe_runs_and_loads(folder):
    result = run_recipe("mnist_cd_student", folder=folder, fast=True, progress=False)
    m = result.metrics
    assert m["1_step"]["nfe"] == 1 and m["2_steps"]["nfe"] == 2 and 0 < m["2_steps"]["second_time"] < 1
    assert 0 <= m["1_step"]["class_accuracy"] <= 1 and m["1_step"]["mnist_fd"] > 0
    model = load("mnist_cd_student", folder=folder, allow_fast=True)
    x1 = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = sample_consistency(model, x1, torch.tensor([1.0]), path=model.path, t_min=T_MIN,
                                 y=torch.tensor([1, 2, 3]))
    assert out.shape == x1.shape and torch.isfinite(out).all()


def test_pd_ladder_chains_from_the_teacher_and_accumulates_time(folder):
    recipe = get_recipe("mnist_pd_16")
    model = build_model(recipe)
    context = _prepare_pd(recipe, model, folder, True)
    teacher = load("mnist_cfm_unet", folder=folder, allow_fast=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values(),
                                                    strict=True))
    assert len(context["grid"]) == 33 and context["grid"][0] == 1 and context["grid"][-1] == 0
    first = run_recipe("mnist_pd_16", folder=folder, fast=True, progress=False).metrics
    second = run_recipe("mnist_pd_8", folder=folder, fast=True, progress=False).metrics
    assert first["nfe"] == 16 and second["nfe"] == 8
    assert second["ladder_train_seconds"] > first["ladder_train_seconds"] > 0


def test_a_missing_teacher_names_the_command_that_builds_it(tmp_path):
    from course.training import CheckpointError

    with pytest.raises(CheckpointError, match="course train mnist_pd_2"):
        run_recipe("mnist_pd_1", folder=tmp_path, fast=True, progress=False)


def test_meanflow_student_starts_as_its_teacher_and_distils_the_guided_velocity(folder):
    from course.distillation_recipes import _prepare_mf
    from course.meanflow import meanflow_loss, sample_time_pairs

    recipe = get_recipe("mnist_meanflow_student")
    model = build_model(recipe)
    context = _prepare_mf(recipe, model, folder, True)
    teacher = load("mnist_cfm_unet", folder=folder, allow_fast=True)
    x, y, t = torch.randn(3, 1, 28, 28), torch.tensor([4, 5, 6]), torch.full((3,), 0.7)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y=y, r=t * 0.1), teacher(x, t, y=y), rtol=0, atol=0)
    # with the teacher's velocity and r = t for every pair, the loss is the distillation of that velocity
    g = torch.Generator().manual_seed(0)
    loss = meanflow_loss(model, x, PATH, share_distinct=0.0, adaptive_p=0.0,
                         teacher_velocity=context["velocity"], generator=g, y=y)
    g = torch.Generator().manual_seed(0)
    tt, _ = sample_time_pairs(3, share_distinct=0.0, generator=g)
    eps = torch.randn(x.shape, generator=g)
    z = PATH.sample(x, tt, eps=eps).x_t
    with torch.no_grad():
        expected = (model(z, tt, y=y, r=tt) - context["velocity"](z, tt, y=y)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    metrics = run_recipe("mnist_meanflow_student", folder=folder, fast=True, progress=False).metrics
    assert metrics["1_step"]["nfe"] == 1 and metrics["2_steps"]["nfe"] == 2


def test_shortcut_student_starts_as_its_teacher_and_distils_the_guided_velocity(folder):
    from course.distillation_recipes import SHORTCUT_MAX_STEPS, _prepare_mf, _sc_loss

    recipe = get_recipe("mnist_shortcut_student")
    assert recipe.kind == "shortcut_student" and recipe.teacher == "mnist_cfm_unet"
    model = build_model(recipe)
    context = _prepare_mf(recipe, model, folder, True)
    teacher = load("mnist_cfm_unet", folder=folder, allow_fast=True)
    x, y, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]), torch.full((4,), 0.6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y=y, r=t - 0.5), teacher(x, t, y=y), rtol=0, atol=0)
    # the recipe's loss: flow-matching rows on the guided velocity, step sizes down to 1 / SHORTCUT_MAX_STEPS
    assert SHORTCUT_MAX_STEPS == 8
    loss = _sc_loss(recipe, model, context)(model, (x, y), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    metrics = run_recipe("mnist_shortcut_student", folder=folder, fast=True, progress=False).metrics
    assert metrics["1_step"]["nfe"] == 1 and metrics["2_steps"]["nfe"] == 2
    assert 0 <= metrics["1_step"]["class_accuracy"] <= 1
