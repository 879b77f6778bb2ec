"""Checks for chapter 08 (latent diffusion).

Exercise 8.1  ``posterior_sample_and_kl(mean, logvar, eps) -> (z, kl)``
Exercise 8.2  ``latent_cfm_loss(velocity, encoder, scale, x, y, eps_posterior, eps, t) -> scalar``
Exercise 8.3  ``sr_condition(x, level, eps_low) -> conditioning image``
Exercise 8.4  ``encode(x) -> z`` and ``decode(z) -> x``: the student's own trained autoencoder

Checks 8.1-8.3 draw fresh inputs from ``seed`` (random posteriors, networks with parameters, times
and augmentation levels, on several shapes). Check 8.4 measures the student's autoencoder on the
held-out MNIST digits with the shipped evaluation classifier. A function of the course itself
(``course.autoencoder.reparameterise``, ``course.cascade.augment_low_res``, ...) is not an answer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ch01 import _generator
from .ch07 import _not_the_library
from .verdict import CheckResult, Mismatch, call_student, compare, gradients, matches, run_check

LATENT_SHAPES = [(8, 4, 7, 7), (5, 3, 2, 2), (6, 16)]


# ---- 8.1 the reparameterised posterior sample and its KL ----------------------------------------------
def _kl(mean: Tensor, logvar: Tensor, *, half=True, minus_one=True, reduce="sum") -> Tensor:
    terms = mean.pow(2) + logvar.exp() - (1.0 if minus_one else 0.0) - logvar
    per = terms.flatten(1)
    value = per.sum(1) if reduce == "sum" else per.mean(1)
    return 0.5 * value if half else value


def _pair(got, name: str, where: str):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{name} returned {type(got).__name__} {where}; expected a pair (z, kl)")
    return got


def check_posterior_sample_and_kl(posterior_sample_and_kl: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 8.1: z = mean + exp(logvar / 2) eps and KL(q || N(0, I)) per sample."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(posterior_sample_and_kl, "posterior_sample_and_kl")
        for shape in LATENT_SHAPES:
            mean = (1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
            logvar = (-3 + 2.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
            eps = torch.randn(shape, generator=gen, dtype=torch.float64)
            where = f"for latents of shape {shape}"
            z, kl = _pair(call_student(posterior_sample_and_kl, "posterior_sample_and_kl", mean, logvar,
                                       eps.clone(), where=where), "posterior_sample_and_kl", where)
            m, lv = mean.detach(), logvar.detach()
            std = (0.5 * lv).exp()
            compare("z", z, m + std * eps, where=where, mistakes={
                "uses exp(logvar) as the standard deviation; exp(logvar) is the variance, the standard deviation "
                "is exp(logvar / 2)": m + lv.exp() * eps,
                "uses logvar itself as the standard deviation": m + lv * eps,
                "leaves the noise unscaled (z = mean + eps); the posterior's standard deviation is exp(logvar / 2)":
                    m + eps,
                "returns the posterior mean: a sample adds exp(logvar / 2) eps": m,
                "uses exp(-logvar / 2), the inverse of the standard deviation": m + (-0.5 * lv).exp() * eps,
            })
            compare("kl", kl, _kl(m, lv), where=where, mistakes={
                "leaves out the factor 1/2": _kl(m, lv, half=False),
                "takes the mean over the latent's entries; the KL of a diagonal Gaussian is a sum over them":
                    _kl(m, lv, reduce="mean"),
                "leaves out the -1 in each entry's 1/2 (mean^2 + var - 1 - logvar)": _kl(m, lv, minus_one=False),
                "adds logvar instead of subtracting it": 0.5 * (m.pow(2) + lv.exp() - 1 + lv).flatten(1).sum(1),
            })
            if not (isinstance(z, Tensor) and z.requires_grad):
                raise Mismatch(f"z {where} has no gradient path to mean and logvar: the reparameterisation trick "
                               "writes the sample as a differentiable function of them (no torch.normal, no detach)")
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
            g_mean, g_logvar = gradients(z, (mean, logvar), w)
            if not matches(g_logvar, w * 0.5 * std * eps, rtol=1e-4, atol=1e-8, dtype=z.dtype):
                raise Mismatch(f"z {where} has the right value but the wrong gradient with respect to logvar "
                               "(is the noise term detached?); d z / d logvar = exp(logvar / 2) eps / 2")
            if not matches(g_mean, w, rtol=1e-4, atol=1e-8, dtype=z.dtype):
                raise Mismatch(f"z {where} has the right value but the wrong gradient with respect to mean")
            if not (isinstance(kl, Tensor) and kl.requires_grad):
                raise Mismatch(f"kl {where} has no gradient path to mean and logvar; the KL term is trained")
            g_mean, g_logvar = gradients(kl, (mean, logvar))
            if not matches(g_mean, m, rtol=1e-4, atol=1e-8, dtype=kl.dtype) \
                    or not matches(g_logvar, 0.5 * (lv.exp() - 1), rtol=1e-4, atol=1e-8, dtype=kl.dtype):
                raise Mismatch(f"kl {where} has the right value but not its gradient (d kl / d mean = mean, "
                               "d kl / d logvar = (exp(logvar) - 1) / 2)")
        return ("posterior_sample_and_kl draws z by the reparameterisation trick with gradients to mean and "
                "logvar, and its KL equals the closed form per sample, on image-shaped and flat latents.")

    return run_check("8.1", "the reparameterised posterior sample and its KL", body)


# ---- 8.2 the latent CFM loss ---------------------------------------------------------------------------
class _Encoder(nn.Module):
    """A small encoder x -> (mean, logvar) with parameters (frozen in the loss)."""

    def __init__(self, gen: torch.Generator, channels: int, latent: int):
        super().__init__()
        self.proj = nn.Parameter(0.5 * torch.randn(2 * latent, channels, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.einsum("oc,bchw->bohw", self.proj, F.avg_pool2d(x, 2))
        mean, logvar = h.chunk(2, dim=1)
        return mean, -2.0 + 0.5 * torch.tanh(logvar)


class _Velocity(nn.Module):
    """A class-conditional ``velocity(z, t, y=...)`` with parameters."""

    def __init__(self, gen: torch.Generator, latent: int):
        super().__init__()
        self.gain = nn.Parameter(0.5 + torch.rand((), generator=gen, dtype=torch.float64))
        self.label = nn.Parameter(0.3 * torch.randn(11, latent, generator=gen, dtype=torch.float64))

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (z.shape[0],):
            raise ValueError(f"velocity expects t of shape ({z.shape[0]},); got {tuple(getattr(t, 'shape', ()))}")
        if y is None:
            raise ValueError("velocity is class-conditional: call it as velocity(z_t, t, y=y)")
        return self.gain * torch.tanh(z) * (1 + t[:, None, None, None]) + self.label[y][:, :, None, None]


def _latent_loss(velocity, encoder, scale, x, y, e_post, eps, t, *, use_scale=True, divide=False, sample=True,
                 sign=1.0, swap=False, labels=True):
    """The reference loss; the keywords plant mistakes."""
    with torch.no_grad():
        mean, logvar = encoder(x)
        z = mean + (0.5 * logvar).exp() * e_post if sample else mean
        z0 = z / scale if divide else (z * scale if use_scale else z)
    tt = t[:, None, None, None]
    z_t = tt * z0 + (1 - tt) * eps if swap else (1 - tt) * z0 + tt * eps
    target = sign * (eps - z0)
    v = velocity(z_t, t, y=y) if labels else velocity(z_t, t, y=torch.full_like(y, 10))
    return (v - target).pow(2).mean()


def check_latent_cfm_loss(latent_cfm_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 8.2: z0 = s (mu + exp(logvar/2) e), z_t = (1 - t) z0 + t eps, mean (v(z_t, t, y) - (eps - z0))^2."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(latent_cfm_loss, "latent_cfm_loss")
        for b, c, side, latent in ((8, 1, 8, 4), (5, 3, 4, 2)):
            encoder, velocity = _Encoder(gen, c, latent), _Velocity(gen, latent)
            scale = 0.3 + 1.5 * torch.rand((), generator=gen, dtype=torch.float64).item()
            x = torch.rand(b, c, side, side, generator=gen, dtype=torch.float64) * 2 - 1
            y = torch.randint(0, 10, (b,), generator=gen)
            lat = (b, latent, side // 2, side // 2)
            e_post, eps = (torch.randn(lat, generator=gen, dtype=torch.float64) for _ in range(2))
            t = 0.02 + 0.96 * torch.rand(b, generator=gen, dtype=torch.float64)
            where = f"for images of shape {tuple(x.shape)}, latents {lat}, scale {scale:.3f}"
            args = (velocity, encoder, scale, x, y, e_post, eps, t)
            got = call_student(latent_cfm_loss, "latent_cfm_loss", velocity, encoder, scale, x.clone(), y.clone(),
                               e_post.clone(), eps.clone(), t.clone(), where=where)
            if not isinstance(got, Tensor) or got.numel() != 1:
                raise Mismatch(f"latent_cfm_loss returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} "
                               f"{where}; expected a scalar tensor (the mean over every element)")
            expected = _latent_loss(*args)
            compare("latent_cfm_loss", got.reshape(()), expected.detach(), where=where, mistakes={
                "leaves out the latent scale: the diffusion model is trained on scale * z": _latent_loss(
                    *args, use_scale=False),
                "divides by the latent scale; encoding multiplies by it (decoding divides)": _latent_loss(
                    *args, divide=True),
                "trains on the posterior mean; latent diffusion trains on a posterior sample "
                "mean + exp(logvar / 2) eps_posterior": _latent_loss(*args, sample=False),
                "uses the target z0 - eps; on the path z_t = (1 - t) z0 + t eps the velocity d z_t / dt is "
                "eps - z0": _latent_loss(*args, sign=-1.0),
                "swaps the path's ends: z_t = (1 - t) z0 + t eps has the data at t = 0": _latent_loss(*args, swap=True),
                "calls the model without the labels y (the unconditional null class)": _latent_loss(*args, labels=False),
            })
            if not got.requires_grad:
                raise Mismatch(f"latent_cfm_loss {where} has no gradient path to the velocity model's parameters")
            tracked = list(velocity.parameters()) + list(encoder.parameters())
            grads = gradients(got, tracked)
            g_enc = grads[len(list(velocity.parameters())):]
            if any(g is not None and g.abs().max() > 0 for g in g_enc):
                raise Mismatch(f"latent_cfm_loss {where}: gradients flow into the encoder; the autoencoder is "
                               "trained first and frozen, so encode under torch.no_grad()")
            ref = torch.autograd.grad(expected, list(velocity.parameters()))
            for name, g, r in zip(("gain", "label"), grads[:2], ref, strict=True):
                if not matches(g, r, rtol=1e-4, atol=1e-8, dtype=got.dtype):
                    raise Mismatch(f"latent_cfm_loss {where}: the value is right but the gradient with respect to "
                                   f"the model's parameter {name!r} is not (is the model's output detached?)")
        return ("latent_cfm_loss trains the velocity model on scaled posterior samples with the rectified-flow "
                "target, and no gradient reaches the frozen encoder.")

    return run_check("8.2", "the latent CFM loss through a frozen encoder", body)


# ---- 8.3 the SR stage's conditioning image -------------------------------------------------------------
def _sr(x, level, eps_low, *, augment=True, mode="bilinear", align=False, vp=False, pool="mean"):
    low = F.avg_pool2d(x, 2) if pool == "mean" else F.max_pool2d(x, 2)
    s = level[:, None, None, None]
    if augment:
        low = ((1 - s**2).sqrt() if vp else (1 - s)) * low + s * eps_low
    kwargs = {"align_corners": align} if mode == "bilinear" else {}
    return F.interpolate(low, size=x.shape[-2:], mode=mode, **kwargs)


def check_sr_condition(sr_condition: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 8.3: up(aug(down(x), s)), down = 2x2 mean, aug = (1 - s) l + s eps, up = bilinear."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(sr_condition, "sr_condition")
        for shape in ((6, 1, 28, 28), (4, 3, 8, 8)):
            b, c, h, w = shape
            x = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
            level = torch.cat([torch.zeros(1, dtype=torch.float64),
                               0.05 + 0.9 * torch.rand(b - 1, generator=gen, dtype=torch.float64)])
            eps_low = torch.randn(b, c, h // 2, w // 2, generator=gen, dtype=torch.float64)
            where = f"for images of shape {shape} and levels s from 0 to {float(level.max()):.2f}"
            got = call_student(sr_condition, "sr_condition", x.clone(), level.clone(), eps_low.clone(), where=where)
            compare("sr_condition", got, _sr(x, level, eps_low), where=where, mistakes={
                "does not augment: the low-res image is noised to (1 - s) low + s eps_low before upsampling":
                    _sr(x, level, eps_low, augment=False),
                "upsamples by repeating pixels (nearest); the conditioning image is the bilinear upsample "
                "(align_corners=False)": _sr(x, level, eps_low, mode="nearest"),
                "upsamples with align_corners=True; use align_corners=False": _sr(x, level, eps_low, align=True),
                "scales the low-res image by sqrt(1 - s^2) (variance preserving); the augmentation follows the "
                "linear path, (1 - s) low": _sr(x, level, eps_low, vp=True),
                "downsamples by the maximum of each 2x2 block; the low-res image is their mean":
                    _sr(x, level, eps_low, pool="max"),
            })
        return ("sr_condition downsamples by 2x2 means, noises the low-res image on the linear path at each image's "
                "level and upsamples it bilinearly, for 1 and 3 channels.")

    return run_check("8.3", "noise-conditioning augmentation for the super-resolution stage", body)


# ---- 8.4 a measured autoencoder -----------------------------------------------------------------------
MAX_LATENT, MIN_ACCURACY, MAX_MSE = 196, 0.97, 0.03


def check_own_autoencoder(encode: Callable, decode: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 8.4: the student's autoencoder on the held-out digits: a latent of at most 196 numbers
    (1/4 of the pixels), reconstructions with MSE <= 0.03 that the evaluation classifier still reads
    with >= 97 % accuracy; not the shipped autoencoder."""

    def body() -> str:
        from ..datasets import load_mnist
        from ..pretrained import load

        _not_the_library(encode, "encode")
        _not_the_library(decode, "decode")
        held_out = load_mnist("test", verbose=False)
        classifier = load("mnist_classifier")
        x, labels = held_out.images, held_out.labels
        where = f"on the {len(x)} held-out digits"
        with torch.no_grad():
            z = call_student(encode, "encode", x[:10].clone(), where="on 10 held-out digits")
            if not isinstance(z, Tensor) or z.shape[0] != 10:
                raise Mismatch(f"encode returned {type(z).__name__} {tuple(getattr(z, 'shape', ()))} for 10 digits; "
                               "expected a tensor with one latent per digit, shape (10, ...)")
            size = z[0].numel()
            if size > MAX_LATENT:
                raise Mismatch(f"the latent has {size} numbers per digit; at most {MAX_LATENT} (1/4 of the 784 "
                               "pixels) are allowed")
            shipped = load("mnist_autoencoder")
            if z.shape[1:] == torch.Size(shipped.latent_shape) and torch.allclose(
                    z.float(), shipped.encode(x[:10]), atol=1e-4):
                raise Mismatch("encode returns the shipped mnist_autoencoder's latents; train your own autoencoder")
            z = torch.cat([call_student(encode, "encode", part.clone(), where=where) for part in x.split(250)])
            recon = torch.cat([call_student(decode, "decode", part, where=where) for part in z.split(250)])
            if not isinstance(recon, Tensor) or recon.shape != x.shape:
                raise Mismatch(f"decode returned {tuple(getattr(recon, 'shape', ()))} {where}; expected images of "
                               f"shape {tuple(x.shape)}")
            recon = recon.float()
            if not torch.isfinite(recon).all():
                raise Mismatch(f"decode returned NaN or inf {where}")
            mse = float((recon - x).pow(2).mean())
            acc = float((classifier(recon).argmax(1) == labels).double().mean())
        if acc < MIN_ACCURACY:
            raise Mismatch(f"the evaluation classifier reads {100 * acc:.1f} % of the reconstructions correctly {where}; "
                           f"at least {100 * MIN_ACCURACY:.0f} % passes: train longer, or give the latent more room")
        if mse > MAX_MSE:
            raise Mismatch(f"the reconstructions' mean squared error is {mse:.4f} {where} (images in [-1, 1]); at most "
                           f"{MAX_MSE} passes: train longer or with a smaller KL weight")
        return (f"your autoencoder's reconstructions of the held-out digits keep at least {100 * MIN_ACCURACY:.0f} % "
                f"classifier accuracy and an MSE of at most {MAX_MSE}, with at most {MAX_LATENT} latent numbers per digit.")

    return run_check("8.4", "your own autoencoder, measured on held-out digits", body)
