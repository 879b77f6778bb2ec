"""Chapter 08 checks, proven both ways: the solutions pass (in float64 and computed in float32), the
stubs, the course's own functions and planted mistakes fail with one clear line; the measured
autoencoder check passes a good autoencoder and names each way a bad one falls short."""

import pytest
import torch
import torch.nn.functional as F

from course.autoencoder import reparameterise
from course.cascade import augment_low_res
from course.exercises import check, run_checks
from course.pretrained import load
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "08_latent_diffusion"
NAMES = ("posterior_sample_and_kl", "latent_cfm_loss", "sr_condition")
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb", NAMES)
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exercise", ["8.1", "8.2", "8.3"])
def test_solutions_pass(exercise, seed):
    [r] = run_checks(CHAPTER, SOLUTION, seed=seed, only=exercise)
    assert r.passed, str(r)


def test_stubs_fail_cleanly():
    results = run_checks(CHAPTER, STUB)
    assert [r.exercise for r in results] == ["8.1", "8.2", "8.3", "8.4"]
    for r in results:
        assert r.status == "not attempted", str(r)
        _assert_clean_failure(r, "NotImplementedError")


def test_stub_messages_state_the_task_not_the_code():
    for name in (*NAMES, "encode", "decode"):
        with pytest.raises(NotImplementedError) as info:
            STUB[name](*([None] * STUB[name].__code__.co_argcount))
        text = str(info.value)
        assert text.startswith("Exercise 8.")
        for code_word in ("torch.", "F.", "exp(", "no_grad", "avg_pool", "interpolate", "(x", "sqrt(", "mean +"):
            assert code_word not in text, (name, code_word, text)


def test_the_course_functions_are_not_answers():
    _assert_clean_failure(check("8.3", augment_low_res, seed=0), "course's own reference")
    _assert_clean_failure(check("8.1", reparameterise, seed=0), "course's own reference")


def _float32(fn):
    def cast(v):
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def wrapped(*args):
        out = fn(*[cast(a) for a in args])
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    return wrapped


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exercise, name", [("8.1", "posterior_sample_and_kl"), ("8.3", "sr_condition")])
def test_a_float32_answer_passes_every_seed(exercise, name, seed):
    r = check(exercise, _float32(SOLUTION[name]), seed=seed)
    assert r.passed, str(r)


@pytest.mark.parametrize("seed", range(6))
def test_a_float32_latent_loss_passes_every_seed(seed):
    def answer(velocity, encoder, scale, x, y, e_post, eps, t):
        def enc32(x):
            return tuple(v.float() for v in encoder(x.double()))

        def vel32(z, t, y=None):
            return velocity(z.double(), t.double(), y=y).float()
        loss = SOLUTION["latent_cfm_loss"](vel32, enc32, scale, x.float(), y, e_post.float(), eps.float(), t.float())
        return loss.float()
    r = check("8.2", answer, seed=seed)
    assert r.passed, str(r)


# ---- planted mistakes ---------------------------------------------------------------------------------
def _kl_sum(mean, logvar):
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


KL_MISTAKES = {
    "exp(logvar) is the variance": lambda m, lv, e: (m + lv.exp() * e, _kl_sum(m, lv)),
    "logvar itself as the standard deviation": lambda m, lv, e: (m + lv * e, _kl_sum(m, lv)),
    "leaves the noise unscaled": lambda m, lv, e: (m + e, _kl_sum(m, lv)),
    "returns the posterior mean": lambda m, lv, e: (m.clone(), _kl_sum(m, lv)),
    "the inverse of the standard deviation": lambda m, lv, e: (m + (-0.5 * lv).exp() * e, _kl_sum(m, lv)),
    "factor 1/2": lambda m, lv, e: (m + (0.5 * lv).exp() * e, 2 * _kl_sum(m, lv)),
    "a sum over them": lambda m, lv, e: (m + (0.5 * lv).exp() * e,
                                         0.5 * (m.pow(2) + lv.exp() - 1 - lv).flatten(1).mean(1)),
    "the -1": lambda m, lv, e: (m + (0.5 * lv).exp() * e, 0.5 * (m.pow(2) + lv.exp() - lv).flatten(1).sum(1)),
    "adds logvar": lambda m, lv, e: (m + (0.5 * lv).exp() * e, 0.5 * (m.pow(2) + lv.exp() - 1 + lv).flatten(1).sum(1)),
    "no gradient path to mean and logvar": lambda m, lv, e: ((m + (0.5 * lv).exp() * e).detach(), _kl_sum(m, lv)),
    "wrong gradient with respect to logvar": lambda m, lv, e: (m + (0.5 * lv).exp().detach() * e, _kl_sum(m, lv)),
    "kl": lambda m, lv, e: (m + (0.5 * lv).exp() * e, _kl_sum(m, lv).detach()),
    "expected a pair": lambda m, lv, e: m + (0.5 * lv).exp() * e,
}


@pytest.mark.parametrize("fragment", list(KL_MISTAKES))
def test_kl_mistakes_are_named(fragment):
    _assert_clean_failure(check("8.1", KL_MISTAKES[fragment], seed=0), fragment)


def _loss(velocity, encoder, scale, x, y, e_post, eps, t, *, grad_encoder=False, scale_fn=lambda z, s: s * z,
          sample=True, sign=1.0, swap=False, y_arg=True, detach=False, reduce="mean"):
    def encode():
        mean, logvar = encoder(x)
        return scale_fn(mean + (0.5 * logvar).exp() * e_post if sample else mean, scale)
    if grad_encoder:
        z0 = encode()
    else:
        with torch.no_grad():
            z0 = encode()
    tt = t[:, None, None, None]
    z_t = tt * z0 + (1 - tt) * eps if swap else (1 - tt) * z0 + tt * eps
    v = velocity(z_t, t, y=y) if y_arg else velocity(z_t, t, y=torch.full_like(y, 10))
    v = v.detach() if detach else v
    sq = (v - sign * (eps - z0)).pow(2)
    return sq.flatten(1).sum(1).mean() if reduce == "sum" else sq.mean()


LOSS_MISTAKES = {
    "leaves out the latent scale": {"scale_fn": lambda z, s: z},
    "divides by the latent scale": {"scale_fn": lambda z, s: z / s},
    "trains on the posterior mean": {"sample": False},
    "uses the target z0 - eps": {"sign": -1.0},
    "swaps the path's ends": {"swap": True},
    "without the labels y": {"y_arg": False},
    "gradients flow into the encoder": {"grad_encoder": True},
    "no gradient path to the velocity model": {"detach": True},
    "returned": {"reduce": "sum"},  # a scalar: the verdict gives both values
}


@pytest.mark.parametrize("fragment", list(LOSS_MISTAKES))
def test_latent_loss_mistakes_are_named(fragment):
    def answer(*args):
        return _loss(*args, **LOSS_MISTAKES[fragment])
    _assert_clean_failure(check("8.2", answer, seed=0), fragment)


def _sr(x, level, eps_low, *, aug=True, mode="bilinear", align=False, vp=False, pool=F.avg_pool2d, per_image=True):
    s = level[:, None, None, None] if per_image else level.mean()
    low = pool(x, 2)
    if aug:
        low = ((1 - s**2).sqrt() if vp else 1 - s) * low + s * eps_low
    kwargs = {"align_corners": align} if mode == "bilinear" else {}
    return F.interpolate(low, size=x.shape[-2:], mode=mode, **kwargs)


SR_MISTAKES = {
    "does not augment": {"aug": False},
    "nearest": {"mode": "nearest"},
    "align_corners=True": {"align": True},
    "variance preserving": {"vp": True},
    "maximum of each 2x2 block": {"pool": F.max_pool2d},
    "max |error|": {"per_image": False},
}


@pytest.mark.parametrize("fragment", list(SR_MISTAKES))
def test_sr_mistakes_are_named(fragment):
    def answer(x, level, eps_low):
        return _sr(x, level, eps_low, **SR_MISTAKES[fragment])
    _assert_clean_failure(check("8.3", answer, seed=0), fragment)


# ---- 8.4 measured on the held-out digits ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return load("mnist_autoencoder")


def test_a_good_autoencoder_passes(shipped):
    # the shipped weights behind a rescaled latent: not the shipped latents, the same reconstructions
    r = check("8.4", lambda x: 2 * shipped.encode(x), lambda z: shipped.decode(z / 2))
    assert r.passed, str(r)


def test_the_measured_check_names_each_shortfall(shipped):
    _assert_clean_failure(check("8.4", shipped.encode, shipped.decode), "course's own reference")
    _assert_clean_failure(check("8.4", lambda x: shipped.encode(x), lambda z: shipped.decode(z)),
                          "shipped mnist_autoencoder's latents")
    _assert_clean_failure(check("8.4", lambda x: x.flatten(1), lambda z: z.reshape(-1, 1, 28, 28)),
                          "784 numbers per digit; at most 196")

    def swap_some(z):  # every fourth digit decoded from the first digit's latent
        z = z.clone()
        z[::4] = z[:1]
        return shipped.decode(z / 2)
    _assert_clean_failure(check("8.4", lambda x: 2 * shipped.encode(x), swap_some), "at least 97 % passes")
    _assert_clean_failure(check("8.4", lambda x: 2 * shipped.encode(x), lambda z: shipped.decode(z / 2) + 0.2),
                          "mean squared error")
    _assert_clean_failure(check("8.4", lambda x: 2 * shipped.encode(x), lambda z: torch.zeros(len(z), 1, 14, 14)),
                          "expected images of shape (1000, 1, 28, 28)")
