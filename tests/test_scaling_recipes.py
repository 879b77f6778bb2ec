"""Chapter 10's data, measures and recipes: SDXL's degradations and the conditions that record them,
the sharpness and centring measures, edge IoU, guidance that carries extra conditions, and the
DiT, refiner and ControlNet recipes in fast mode (trained, measured, saved, loaded back)."""

import pytest
import torch

from course.controlnet import ControlNet, edge_map
from course.datasets import load_mnist
from course.dit import degrade
from course.guidance import classifier_free_guidance
from course.image_metrics import centre_of_mass, laplacian_sharpness
from course.image_recipes import sample_classes
from course.inpainting import (
    hole_mask,
    inpaint_conditioned,
    inpaint_paste,
    mask_condition,
    random_holes,
)
from course.pretrained import load
from course.recipes import build_model, get_recipe, run_recipe
from course.scaling_recipes import GRID, centring_offset, edge_iou, micro_conditions, sample_refined
from course.unet import UNet


def _digits(n=40, seed=0):
    data = load_mnist("test", offline=True, verbose=False)
    return data.per_class(n // 10, generator=torch.Generator().manual_seed(seed))


def test_degrade_records_what_it_did():
    x = _digits().images
    same, size, crop = degrade(x, small_share=0.0, crop_share=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, x) and (size == 28).all() and (crop == 0).all()
    out, size, crop = degrade(x, small_share=0.0, crop_share=1.0, max_crop=6, generator=torch.Generator().manual_seed(1))
    assert ((crop >= 1) & (crop <= 6)).all() and (size == 28).all()
    for i in range(len(x)):  # the window at (top, left) of the image extended with background
        top, left = int(crop[i, 0]), int(crop[i, 1])
        assert torch.equal(out[i, :, :28 - top, :28 - left], x[i, :, top:, left:])
        assert (out[i, :, 28 - top:] == -1).all() and (out[i, :, :, 28 - left:] == -1).all()
    out, size, crop = degrade(x, small_share=1.0, crop_share=0.0, min_size=8, generator=torch.Generator().manual_seed(2))
    assert ((size >= 8) & (size <= 27)).all() and (crop == 0).all() and size.unique().numel() > 5
    assert (laplacian_sharpness(out) < laplacian_sharpness(x)).all()  # every downscaled digit is blurred
    flat = torch.full((3, 1, 28, 28), 0.25)  # resizing keeps a constant image
    assert torch.allclose(degrade(flat, small_share=1.0, crop_share=0.0)[0], flat, atol=1e-6)
    half, size, _ = degrade(x.repeat(10, 1, 1, 1), generator=torch.Generator().manual_seed(3))
    assert 0.4 < float((size < 28).double().mean()) < 0.6  # the default shares are one half


@pytest.mark.parametrize("kwargs, message", [({"small_share": 1.5}, "shares"), ({"min_size": 28}, "min_size"),
                                             ({"max_crop": 0}, "max_crop")])
def test_degrade_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        degrade(torch.zeros(2, 1, 28, 28), **kwargs)
    with pytest.raises(ValueError, match="square images"):
        degrade(torch.zeros(2, 1, 28, 20))


def test_sharpness_and_centre_of_mass_in_closed_form():
    x = torch.full((2, 1, 9, 9), -1.0)
    x[0, 0, 4, 4] = 1.0  # one pixel of ink: Laplacian -4 at it, 1 at its 4 neighbours, 0 on the rest of 7 x 7
    values = torch.zeros(49, dtype=torch.float64)
    values[:5] = torch.tensor([-4.0, 1, 1, 1, 1])
    assert laplacian_sharpness(x)[0].item() == pytest.approx(values.var().item(), abs=1e-12)
    x[1, 0, 2, 6] = 1.0
    x[1, 0, 6, 6] = 0.0  # half the ink
    assert centre_of_mass(x[:1]).tolist() == [[4.0, 4.0]]
    assert centre_of_mass(x[1:]).squeeze().tolist() == pytest.approx([(2 + 0.5 * 6) / 1.5, 6.0], abs=1e-12)
    assert laplacian_sharpness(torch.zeros(1, 1, 5, 5)).item() == 0.0
    with pytest.raises(ValueError, match="no ink"):
        centre_of_mass(torch.full((1, 1, 5, 5), -1.0))
    digits = _digits(200).images
    assert float(centring_offset(digits).mean()) < 1.0  # MNIST is centred on (14, 14)
    shifted, _, _ = degrade(digits, small_share=0.0, crop_share=1.0, generator=torch.Generator().manual_seed(0))
    assert float(centring_offset(shifted).mean()) > 2.5


def test_edge_iou_is_one_for_the_image_itself_and_zero_for_disjoint_strokes():
    x = _digits(20).images
    assert torch.equal(edge_iou(x, edge_map(x)), torch.ones(20))
    a = torch.full((1, 1, 12, 12), -1.0)
    b = a.clone()
    a[..., 1:4, 1:4] = 1.0
    b[..., 7:10, 7:10] = 1.0
    assert edge_iou(a, edge_map(b)).item() == 0.0


def test_guidance_and_sampling_carry_extra_conditions_to_both_halves():
    calls = []

    def model(x, t, y, control, strength=1.0):
        calls.append((x.shape[0], control.shape[0], strength))
        return x * 0 + control * strength + (y != 10).float()[:, None, None, None]

    field = classifier_free_guidance(model, 2.0, null_label=10)
    x, control = torch.zeros(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    out = field(x, torch.full((3,), 0.5), y=torch.tensor([1, 2, 3]), control=control, strength=0.5)
    assert calls == [(6, 6, 0.5)]  # one batch of 2B: the control repeated, the strength as is
    assert torch.allclose(out, 0.5 * control + 3.0)  # (1 + w) (c + 1) - w c
    net = UNet(1, channels=(8, 8, 8), num_classes=10, patch=2, micro_size=28)
    labels = torch.arange(5)
    cond = micro_conditions(5, 28, (0, 0))
    a = sample_classes(net, labels, nfe=2, generator=torch.Generator().manual_seed(0), batch=2, **cond)
    b = sample_classes(net, labels, nfe=2, generator=torch.Generator().manual_seed(0), batch=5, **cond)
    assert a.shape == (5, 1, 28, 28) and torch.allclose(a, b, atol=1e-6)  # conditions split with the labels


def test_the_recipes_build_what_the_chapter_needs():
    assert len(GRID) == 6
    shapes = {name: (build_model(get_recipe(name)).patch, len(build_model(get_recipe(name)).blocks)) for name in GRID}
    assert set(shapes.values()) == {(7, 2), (4, 2), (7, 4), (4, 4), (7, 6), (4, 6)}
    assert build_model(get_recipe("mnist_unet_micro")).micro is not None
    assert build_model(get_recipe("mnist_unet_degraded")).micro is None
    assert isinstance(build_model(get_recipe("mnist_controlnet")), ControlNet)
    assert get_recipe("mnist_unet_grid").steps == get_recipe(GRID[0]).steps  # the same steps on the scaling axes


def test_fast_runs_measure_save_and_load_back(tmp_path):
    for name in ("mnist_classifier", "mnist_cfm_unet"):
        run_recipe(name, folder=tmp_path, fast=True, progress=False)
    m = run_recipe("mnist_dit_xs_p7", folder=tmp_path, fast=True, progress=False).metrics
    assert 0 < m["gflops_per_forward"] < 0.01 and 0 <= m["class_accuracy"] <= 1
    m = run_recipe("mnist_unet_micro", folder=tmp_path, fast=True, progress=False).metrics
    assert set(m) >= {"full size, crop (0, 0)", "size 8, crop (0, 0)", "full size, crop (6, 6)", "held_out_sharpness"}
    assert m["full size, crop (0, 0)"]["class_accuracy"] >= 0 and m["size 8, crop (0, 0)"]["sharpness"] > 0
    m = run_recipe("mnist_refiner", folder=tmp_path, fast=True, progress=False).metrics
    assert set(m) >= {"base alone", "base + refiner"} and m["t_switch"] == 0.3
    m = run_recipe("mnist_inpaint_unet", folder=tmp_path, fast=True, progress=False).metrics
    assert set(m) >= {"centre", "bottom half", "right half"} and 0 <= m["centre"]["class_accuracy"] <= 1
    m = run_recipe("mnist_controlnet", folder=tmp_path, fast=True, progress=False).metrics
    assert 0 <= m["controlnet"]["edge_iou"] <= 1 and 0 <= m["base (no control)"]["edge_iou"] <= 1
    net = load("mnist_controlnet", folder=tmp_path, allow_fast=True)
    base = load("mnist_cfm_unet", folder=tmp_path, allow_fast=True)
    assert all(torch.equal(a, b) for a, b in zip(net.base.state_dict().values(), base.state_dict().values(),
                                                  strict=True))  # the base stayed frozen
    refiner = load("mnist_refiner", folder=tmp_path, allow_fast=True)
    labels = torch.arange(4)
    alone = sample_refined(base, None, labels, t_switch=0.3, nfe=4, generator=torch.Generator().manual_seed(0))
    same = sample_classes(base, labels, nfe=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(alone, same, atol=1e-6)
    both = sample_refined(base, refiner, labels, t_switch=0.3, nfe=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(both, alone)


def test_hole_masks_and_the_naive_paste():
    known = hole_mask(3, "centre")
    assert known.shape == (3, 1, 28, 28) and int((~known[0]).sum()) == 144
    assert int((~hole_mask(1, "bottom half")).sum()) == 14 * 28 and not hole_mask(1, "right half")[0, 0, 0, 20]
    assert int((~hole_mask(1, "centre", side=14)).sum()) == 36  # scaled to the side
    with pytest.raises(ValueError, match="unknown hole"):
        hole_mask(1, "top")

    def velocity(x, t, y=None):  # the exact velocity towards a fixed image c on the linear path
        return (x - c) / t.clamp_min(1e-3)[:, None, None, None]

    c = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28).repeat(3, 1, 1, 1)
    x0 = -c
    out = inpaint_paste(velocity, x0, known, nfe=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[known], x0[known])  # the known pixels pasted exactly
    assert torch.allclose(out[~known], c[~known], atol=1e-5)  # the hole is what the free sample made


def test_a_micro_conditioned_unet_needs_its_conditions_and_uses_them():
    net = UNet(1, channels=(8, 8, 8), num_classes=10, patch=2, micro_size=28)
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="micro-conditioned"):
        net(x, t, y)
    with pytest.raises(ValueError, match=r"original sizes in \[1, 28\]"):
        net(x, t, y, **micro_conditions(2, 40, (0, 0)))
    assert net(x, t, y, **micro_conditions(2, 28, (0, 0))).shape == x.shape
    a = net.encode(x, t, y, **micro_conditions(2, 28, (0, 0)))[0]
    b = net.encode(x, t, y, **micro_conditions(2, 8, (0, 0)))[0]
    assert not torch.allclose(a, b)  # the size reaches the embedding every block reads
    plain = UNet(1, channels=(8, 8, 8), num_classes=10, patch=2)
    with pytest.raises(ValueError, match="no size or crop"):
        plain(x, t, y, **micro_conditions(2, 28, (0, 0)))
    with pytest.raises(ValueError, match="no context, low_res, r or size"):
        ControlNet(net)


def test_training_holes_and_the_mask_conditioned_sampler():
    known = random_holes(400, generator=torch.Generator().manual_seed(0))
    assert known.shape == (400, 1, 28, 28) and known.dtype == torch.bool
    hidden = (~known).flatten(1).sum(1)
    assert (hidden >= 7 * 7).all() and (hidden <= 392).all()  # every mask hides something, at most half
    named = sum(bool(torch.equal(k, hole_mask(1, h)[0])) for k in known for h in ("centre", "bottom half", "right half"))
    assert 60 < named < 140  # a quarter of the masks are the chapter's holes
    x = _digits(20).images
    k = hole_mask(20, "centre")
    cond = mask_condition(x, k)
    assert cond.shape == (20, 2, 28, 28) and (cond[:, :1][~k] == 0).all() and torch.equal(cond[:, :1][k], x[k])
    assert set(cond[:, 1].unique().tolist()) == {-1.0, 1.0}
    seen = []

    def model(x_t, t, low_res):
        seen.append(low_res)
        return torch.zeros_like(x_t)

    out = inpaint_conditioned(model, x, k, nfe=3, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3 and all(torch.equal(s, cond) for s in seen)  # the model sees the known pixels every step
    assert torch.equal(out[k], x[k])
    with pytest.raises(ValueError, match="boolean mask"):
        mask_condition(x, k.float())
