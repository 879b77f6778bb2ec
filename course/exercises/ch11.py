"""Checks for chapter 11 (diffusion meets GANs).

Exercise 11.1  ``diffusion_augment(real, fake, t_max, u, eps_real, eps_fake) -> (y_real, y_fake, t)``: Diffusion-GAN's input
Exercise 11.2  ``lpips(feats_a, feats_b, weights) -> (B,)``: the LPIPS distance from feature maps and weights
Exercise 11.3  ``add_distillation_loss(teacher, x_student, t, eps) -> scalar``: ADD's distillation loss with its stop-gradient
Exercise 11.4  ``r1_penalty(disc, real, gamma) -> scalar``: the R1 penalty, differentiable in the discriminator

Every check draws fresh inputs from ``seed`` (images, feature maps, weights, a teacher and a
discriminator with parameters). The course's own ``course.gan``, ``course.perceptual`` and
``course.adversarial`` are not answers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .ch01 import _generator
from .ch07 import _not_the_library
from .verdict import CheckResult, Mismatch, call_student, compare, gradients, matches, run_check


def _tensor_out(name: str, got, shape: tuple, where: str) -> Tensor:
    if not isinstance(got, Tensor) or tuple(got.shape) != tuple(shape):
        raise Mismatch(f"{name} returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} {where}; "
                       f"expected a tensor of shape {tuple(shape)}")
    return got


# ---- 11.1 Diffusion-GAN's discriminator input --------------------------------------------------------
def _augment(real, fake, t_max, u, e_r, e_f, *, kind: str = "right"):
    t = t_max * u if kind == "uniform" else t_max * u.sqrt()
    e_f = e_r if kind == "same-noise" else e_f

    def path(x, tt, e):
        tt = tt[:, None, None, None]
        return tt * x + (1 - tt) * e if kind == "swap" else (1 - tt) * x + tt * e

    return path(real, t, e_r), path(fake, t, e_f), t


def _other_times(y_f: Tensor, fake: Tensor, e_f: Tensor, t: Tensor, where: str) -> None:
    """Raise if ``y_f`` is ``fake`` diffused with its own noise to times other than ``t`` (row by row)."""
    y = y_f.detach().to(fake.dtype)
    d = (e_f - fake).flatten(1)
    tau = ((y - fake).flatten(1) * d).sum(1) / d.pow(2).sum(1)  # least squares: y = fake + tau (eps - fake)
    fit = fake.flatten(1) + tau[:, None] * d
    on_path = bool(torch.allclose(fit, y.flatten(1), rtol=1e-4, atol=1e-5))
    if on_path and not bool(torch.allclose(tau, t, rtol=1e-4, atol=1e-6)):
        raise Mismatch(f"diffusion_augment {where}: the generated images are diffused to other times than the real "
                       "ones; row i of both shares t_i, so the discriminator compares them at one noise level")


def check_diffusion_augment(diffusion_augment: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 11.1: t = t_max sqrt(u) (density 2t / t_max^2), one t per row for real and fake,
    y = (1 - t) x + t eps with each its own noise, differentiable in ``fake``."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(diffusion_augment, "diffusion_augment")
        for b, c, h, t_max in ((5, 1, 6, 0.4), (3, 2, 4, 0.9), (8, 1, 5, 0.15)):
            real = torch.randn(b, c, h, h, generator=gen, dtype=torch.float64)
            fake = torch.randn(b, c, h, h, generator=gen, dtype=torch.float64).requires_grad_(True)
            u = torch.rand(b, generator=gen, dtype=torch.float64)
            e_r, e_f = (torch.randn(b, c, h, h, generator=gen, dtype=torch.float64) for _ in range(2))
            where = f"for {b} images of shape {(c, h, h)} and t_max = {t_max}"
            got = call_student(diffusion_augment, "diffusion_augment", real.clone(), fake, t_max, u.clone(),
                               e_r.clone(), e_f.clone(), where=where)
            if not isinstance(got, tuple) or len(got) != 3:
                raise Mismatch(f"diffusion_augment returned {type(got).__name__} {where}; expected the tuple "
                               "(y_real, y_fake, t)")
            y_r, y_f, t = (_tensor_out("diffusion_augment", g, s, where)
                           for g, s in zip(got, (real.shape, real.shape, (b,)), strict=True))
            args = (real, fake.detach(), t_max, u, e_r, e_f)
            want_r, want_f, want_t = _augment(*args)
            compare("diffusion_augment's t", t, want_t, where=where, mistakes={
                "draws t uniformly on [0, t_max]; Diffusion-GAN's density is 2t / t_max^2, whose inverse CDF "
                "maps u to t_max sqrt(u)": _augment(*args, kind="uniform")[2],
            })
            compare("diffusion_augment's y_real", y_r, want_r, where=where, mistakes={
                "swaps the path's ends: y = (1 - t) x + t eps keeps the image at t = 0": _augment(*args, kind="swap")[0],
            })
            _other_times(y_f, fake.detach(), e_f, want_t, where)
            compare("diffusion_augment's y_fake", y_f, want_f, where=where, mistakes={
                "reuses the real images' noise for the generated ones; each gets its own (eps_fake)":
                    _augment(*args, kind="same-noise")[1],
                "swaps the path's ends: y = (1 - t) x + t eps keeps the image at t = 0": _augment(*args, kind="swap")[1],
            })
            grad = gradients(y_f, [fake])[0] if y_f.requires_grad else None
            want = (1 - want_t)[:, None, None, None].expand_as(fake)
            if grad is None or not matches(grad, want, rtol=1e-6, atol=1e-9, dtype=y_f.dtype):
                raise Mismatch(f"diffusion_augment {where}: y_fake carries no (or the wrong) gradient to the generated "
                               "images; the generator learns through the diffusion, so do not detach them")
        return ("diffusion_augment draws t with density 2t / t_max^2, diffuses real and generated images to the same t "
                "with their own noise, and lets the generator's gradient through.")

    return run_check("11.1", "Diffusion-GAN's discriminator input", body)


# ---- 11.2 LPIPS -----------------------------------------------------------------------------------
def _lpips(fa, fb, weights, *, kind: str = "right") -> Tensor:
    out = 0.0
    for a, b, w in zip(fa, fb, weights, strict=True):
        if kind == "no-normalise":
            na, nb = a, b
        elif kind == "spatial-normalise":
            na = a / a.flatten(2).norm(dim=2)[:, :, None, None]
            nb = b / b.flatten(2).norm(dim=2)[:, :, None, None]
        else:
            na, nb = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        sq = (na - nb).pow(2)
        ww = w.pow(2) if kind == "squared-weights" else w
        per = (ww[None, :, None, None] * sq).sum(1)  # (B, H, W)
        if kind == "sqrt":
            per = per.sqrt()
        out = out + (per.sum((-2, -1)) if kind == "spatial-sum" else per.mean((-2, -1)))
    return out


def check_lpips(lpips: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 11.2: unit-normalise each layer over channels, weight squared differences per
    channel, sum over channels, average over positions, sum over layers."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(lpips, "lpips")
        for b, layers in ((4, ((3, 5, 5), (6, 3, 3))), (2, ((4, 7, 7),)), (3, ((2, 4, 4), (5, 2, 2), (3, 1, 1)))):
            fa = [torch.randn(b, *s, generator=gen, dtype=torch.float64) * (1 + i) for i, s in enumerate(layers)]
            fb = [torch.randn(b, *s, generator=gen, dtype=torch.float64) * (1 + i) for i, s in enumerate(layers)]
            weights = [torch.rand(s[0], generator=gen, dtype=torch.float64) * 2 for s in layers]
            where = f"for {b} images and layers of shapes {list(layers)}"
            got = call_student(lpips, "lpips", [f.clone() for f in fa], [f.clone() for f in fb],
                               [w.clone() for w in weights], where=where)
            got = _tensor_out("lpips", got, (b,), where)
            args = (fa, fb, weights)
            compare("lpips", got, _lpips(*args), where=where, mistakes={
                "does not normalise the features; divide each position's feature vector by its length over the "
                "channels first": _lpips(*args, kind="no-normalise"),
                "normalises each channel over the positions; LPIPS normalises each position's vector over the "
                "channels": _lpips(*args, kind="spatial-normalise"),
                "sums over the positions; LPIPS averages over them (so layers of every size count alike)":
                    _lpips(*args, kind="spatial-sum"),
                "takes a square root per position; the distance is the weighted *squared* difference":
                    _lpips(*args, kind="sqrt"),
                "squares the weights; they multiply the squared differences as they are":
                    _lpips(*args, kind="squared-weights"),
            })
            same = call_student(lpips, "lpips", [f.clone() for f in fa], [f.clone() for f in fa],
                                [w.clone() for w in weights], where=where)
            if not matches(_tensor_out("lpips", same, (b,), where), torch.zeros(b, dtype=torch.float64), rtol=0,
                           atol=1e-9):
                raise Mismatch(f"lpips {where}: the distance of images to themselves is not 0")
        return "lpips normalises over channels, weights the squared differences, averages over positions, sums layers."

    return run_check("11.2", "the LPIPS distance", body)


# ---- 11.3 ADD's distillation loss -----------------------------------------------------------------
class _Teacher(nn.Module):
    """A planted teacher ``teacher(x_t, t) -> x0 prediction`` with parameters (nonlinear in x_t)."""

    def __init__(self, gen: torch.Generator, d: int):
        super().__init__()
        self.w = nn.Parameter(0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"teacher expects t of shape ({x.shape[0]},), one time per image; got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        flat = x.flatten(1)
        return (torch.tanh(flat @ self.w) * (1 - t[:, None])).reshape(x.shape)


def _distill(teacher, x, t, eps, *, kind: str = "right") -> Tensor:
    tt = t[:, None, None, None]
    xs = x if kind == "no-stop-grad" else x.detach()
    x_t = tt * xs + (1 - tt) * eps if kind == "swap" else (1 - tt) * xs + tt * eps
    target = teacher(x_t, t)
    if kind != "no-stop-grad":
        target = target.detach()
    per = (x - target).pow(2).flatten(1).mean(1)
    weight = {"no-weight": torch.ones_like(t), "t-weight": t}.get(kind, 1 - t)
    return (weight * per).mean()


def check_add_distillation_loss(add_distillation_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 11.3: x_t = (1 - t) sg(x^) + t eps; loss = mean_i (1 - t_i) mean (x^_i - sg(teacher(x_t, t))_i)^2."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(add_distillation_loss, "add_distillation_loss")
        for b, c, h in ((4, 1, 3), (6, 2, 2), (3, 1, 4)):
            teacher = _Teacher(gen, c * h * h)
            x = torch.randn(b, c, h, h, generator=gen, dtype=torch.float64).requires_grad_(True)
            t = 0.05 + 0.9 * torch.rand(b, generator=gen, dtype=torch.float64)
            eps = torch.randn(b, c, h, h, generator=gen, dtype=torch.float64)
            where = f"for {b} student images of shape {(c, h, h)}"
            got = call_student(add_distillation_loss, "add_distillation_loss", teacher, x, t.clone(), eps.clone(),
                               where=where)
            if not isinstance(got, Tensor) or got.numel() != 1:
                raise Mismatch(f"add_distillation_loss returned {type(got).__name__} "
                               f"{tuple(getattr(got, 'shape', ()))} {where}; expected a scalar tensor")
            args = (teacher, x, t, eps)
            expected = _distill(*args)
            compare("add_distillation_loss", got.reshape(()), expected.detach(), where=where, mistakes={
                "does not weight by c(t) = 1 - t; ADD weights each image's error by alpha(t)":
                    _distill(*args, kind="no-weight").detach(),
                "weights by t; c(t) = alpha(t) = 1 - t gives the noisier (blurrier) teacher predictions less weight":
                    _distill(*args, kind="t-weight").detach(),
                "swaps the path's ends: x_t = (1 - t) x + t eps": _distill(*args, kind="swap").detach(),
            })
            if not got.requires_grad:
                raise Mismatch(f"add_distillation_loss {where} has no gradient path to the student's images")
            grad, *teacher_grads = gradients(got, [x, *teacher.parameters()])
            want = torch.autograd.grad(expected, [x])[0]
            wrong = torch.autograd.grad(_distill(*args, kind="no-stop-grad"), [x])[0]
            if grad is not None and matches(grad, wrong, rtol=1e-6, atol=1e-10, dtype=got.dtype) and \
                    not matches(grad, want, rtol=1e-6, atol=1e-10, dtype=got.dtype):
                raise Mismatch(f"add_distillation_loss {where}: the value is right but the gradient flows through the "
                               "teacher's target; the target is a stop-gradient (compute it from x^ detached, and "
                               "detach the teacher's output)")
            if grad is None or not matches(grad, want, rtol=1e-6, atol=1e-10, dtype=got.dtype):
                raise Mismatch(f"add_distillation_loss {where}: the value is right but its gradient with respect to the "
                               "student's images is not 2 c(t) (x^ - target) / (B D)")
            if any(g is not None and float(g.abs().max()) > 0 for g in teacher_grads):
                raise Mismatch(f"add_distillation_loss {where}: the loss has a gradient with respect to the teacher's "
                               "weights; the teacher is frozen and its prediction a stop-gradient target")
        return ("add_distillation_loss noises the detached student image, takes the teacher's prediction as a "
                "stop-gradient target and weights each image's error by 1 - t.")

    return run_check("11.3", "ADD's distillation loss", body)


# ---- 11.4 R1 --------------------------------------------------------------------------------------
class _Disc(nn.Module):
    """A planted discriminator ``disc(x) -> (B,)`` logits with parameters (a small smooth MLP)."""

    def __init__(self, gen: torch.Generator, d: int):
        super().__init__()
        self.w1 = nn.Parameter(0.6 * torch.randn(d, 8, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(0.6 * torch.randn(8, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def _r1(disc, real, gamma, *, kind: str = "right") -> Tensor:
    x = real.detach().requires_grad_(True)
    logits = disc(x)
    out = logits.mean() if kind == "grad-of-mean" else logits.sum()
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    sq = g.flatten(1).pow(2).sum(1)
    if kind == "norm":
        sq = sq.sqrt()
    per = sq.mean() if kind != "batch-sum" else sq.sum()
    return (gamma if kind == "no-half" else 0.5 * gamma) * per


def check_r1_penalty(r1_penalty: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 11.4: gamma / 2 * mean_i ||d disc(x_i) / d x_i||^2, differentiable in the discriminator."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(r1_penalty, "r1_penalty")
        for b, c, h, gamma in ((5, 1, 3, 2.0), (3, 2, 2, 0.5), (7, 1, 4, 10.0)):
            disc = _Disc(gen, c * h * h)
            real = torch.randn(b, c, h, h, generator=gen, dtype=torch.float64)
            where = f"for {b} real images of shape {(c, h, h)} and gamma = {gamma}"
            got = call_student(r1_penalty, "r1_penalty", disc, real.clone(), gamma, where=where)
            if not isinstance(got, Tensor) or got.numel() != 1:
                raise Mismatch(f"r1_penalty returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} {where}; "
                               "expected a scalar tensor")
            args = (disc, real, gamma)
            expected = _r1(*args)
            compare("r1_penalty", got.reshape(()), expected.detach(), where=where, mistakes={
                "leaves out the 1/2: R1 is gamma / 2 times the mean squared gradient norm": _r1(*args, kind="no-half"),
                "differentiates the batch mean of the logits, which divides every gradient by B; each image's "
                "gradient is that of its own logit (differentiate the sum)": _r1(*args, kind="grad-of-mean"),
                "uses the gradient's norm; R1 penalises its squared norm": _r1(*args, kind="norm"),
                "sums over the batch; R1 averages over the real images": _r1(*args, kind="batch-sum"),
            })
            if not got.requires_grad:
                raise Mismatch(f"r1_penalty {where} cannot train the discriminator: it has no gradient path to its "
                               "weights (take the input gradient with create_graph=True)")
            grads = gradients(got, list(disc.parameters()))
            ref = torch.autograd.grad(expected, list(disc.parameters()))
            for name, g, want in zip(("w1", "w2"), grads, ref, strict=True):
                if g is None or not matches(g, want, rtol=1e-5, atol=1e-9, dtype=got.dtype):
                    raise Mismatch(f"r1_penalty {where}: the value is right but its gradient with respect to the "
                                   f"discriminator's {name!r} is not (create_graph=True keeps the graph of the input "
                                   "gradient)")
        return "r1_penalty is gamma / 2 times the mean squared input gradient of the logits, and trains the discriminator."

    return run_check("11.4", "the R1 penalty", body)
