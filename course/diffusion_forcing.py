"""Diffusion Forcing (Chen, Marti Monso, Du, Simchowitz, Tedrake & Sitzmann 2024): one causal
model that is a next-token predictor, a full-sequence diffusion model and everything between.

Training gives **every token its own noise level**: a sequence x_1..x_T is noised token by token,
x_t^i = alpha(t_i) x^i + sigma(t_i) eps^i with t_i ~ U[0, 1] drawn independently, and a causal
model v_theta(x^1..x^T, t_1..t_T) learns each token's velocity from the noisy past and its own
noise level. Noise is masking with a dial: t = 0 is an observed token, t = 1 an unknown one,
anything between a partly known one.

Sampling follows a **scheduling matrix** K (:func:`scheduling_matrix`): row m gives every token's
noise level (0..steps) at sampling step m; going from row m to m + 1 moves each token from level
K[m, i] to K[m + 1, i]. All tokens together is full-sequence diffusion; one token fully denoised
after another is autoregression (teacher forcing's sampler); the **pyramid** lets near tokens run
ahead of far ones. Tokens generated earlier and fed back as context are marked slightly noisy
(a stabilisation level, and noised to it), which is what keeps long rollouts from compounding
their own small errors.

The sequences here come from a pendulum (:func:`simulate_pendulum`), whose truth is known: the
bob stays on the unit circle and its energy is conserved, so a rollout far past the training
horizon can be checked.

Per-token times break convention 2 of the course (``t`` of shape ``(B,)``) only inside the
sequence model: ``model(x, t)`` takes ``x`` ``(B, T, D)`` and ``t`` ``(B, T)``. The Gaussian path
is used unchanged, on the tokens flattened to ``(B T, D)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .autoregressive import posterior_step
from .conversions import to_eps, to_x0
from .flow_matching import conditional_velocity
from .nets import SinusoidalTimeEmbedding
from .paths import GaussianPath
from .samplers import gaussian_like
from .transformer import Transformer
from .utils import check_batch, check_positive, check_positive_int

__all__ = ["SCHEDULES", "NOISE_MODES", "scheduling_matrix", "simulate_pendulum", "pendulum_state",
           "pendulum_energy", "radius_error", "CausalDenoiser", "diffusion_forcing_loss",
           "sample_diffusion_forcing"]

SCHEDULES = ("full_sequence", "pyramid", "autoregressive")
NOISE_MODES = ("independent", "full_sequence", "teacher_forcing")


def scheduling_matrix(horizon: int, steps: int, kind: str = "pyramid") -> Tensor:
    """The noise level (0..``steps``) of each of ``horizon`` tokens at each sampling step: an int64
    matrix ``(rows, horizon)`` whose first row is all ``steps`` (pure noise) and last row all 0.

    K[m, i] = clip(steps + u i - m, 0, steps) with u = 0 (``full_sequence``: every token at the
    same level), u = 1 (``pyramid``: each token one level behind the one before) or u = steps
    (``autoregressive``: a token starts when the one before is clean). Rows: steps + u (horizon -
    1) + 1. Levels never rise down a column and never fall along a row.
    """
    horizon, steps = check_positive_int(horizon, "horizon"), check_positive_int(steps, "steps")
    slope = {"full_sequence": 0, "pyramid": 1, "autoregressive": steps}.get(kind)
    if slope is None:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    rows = steps + slope * (horizon - 1) + 1
    m, i = torch.arange(rows)[:, None], torch.arange(horizon)[None, :]
    return (steps + slope * i - m).clamp(0, steps)


# ---- the pendulum: sequences with a known truth ----------------------------------------------------
def _pendulum_rhs(state: Tensor, omega0: float) -> Tensor:
    theta, speed = state[..., 0], state[..., 1]
    return torch.stack([speed, -omega0**2 * torch.sin(theta)], dim=-1)


def pendulum_state(state: Tensor, time: float, *, omega0: float = 1.0, substeps: int = 200) -> Tensor:
    """The state (angle, angular velocity) ``(..., 2)`` of the frictionless pendulum
    theta'' = -omega0^2 sin(theta) after ``time``, by classical Runge-Kutta in float64 with
    ``substeps`` steps (energy is conserved to ~1e-10 at the step sizes used here; tested)."""
    x = state.to(torch.float64)
    h = float(time) / check_positive_int(substeps, "substeps")
    for _ in range(substeps):
        k1 = _pendulum_rhs(x, omega0)
        k2 = _pendulum_rhs(x + h / 2 * k1, omega0)
        k3 = _pendulum_rhs(x + h / 2 * k2, omega0)
        k4 = _pendulum_rhs(x + h * k3, omega0)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def simulate_pendulum(n: int, length: int, *, dt: float = 0.3, omega0: float = 1.0, max_energy: float = 1.6,
                      generator: torch.Generator | None = None, states: Tensor | None = None,
                      substeps: int = 20) -> tuple[Tensor, Tensor]:
    """``n`` pendulum sequences of ``length`` tokens, one every ``dt``: the bob's position
    (sin theta, -cos theta) ``(n, length, 2)`` on the unit circle, and the true states (theta,
    theta') ``(n, length, 2)``. Start states are drawn with energy E = theta'^2 / 2 + omega0^2 (1 -
    cos theta) uniform below ``max_energy`` (< 2 omega0^2: it swings, never loops), or given as
    ``states`` ``(n, 2)``. float64."""
    n, length = check_positive_int(n, "n"), check_positive_int(length, "length")
    check_positive(dt, "dt")
    if not 0 < max_energy < 2 * omega0**2:
        raise ValueError(f"expected 0 < max_energy < 2 omega0^2 = {2 * omega0**2:g} (a swinging pendulum); "
                         f"got {max_energy}")
    if states is None:
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        energy = max_energy * u[:, 0]
        amplitude = torch.arccos(1 - energy / omega0**2)  # the turning angle of that energy
        theta = amplitude * (2 * u[:, 1] - 1)
        speed = torch.sqrt((2 * (energy - omega0**2 * (1 - torch.cos(theta)))).clamp_min(0.0))
        states = torch.stack([theta, torch.where(u[:, 2] < 0.5, -speed, speed)], dim=1)
    elif states.shape != (n, 2):
        raise ValueError(f"expected states of shape ({n}, 2); got {tuple(states.shape)}")
    out, x = [], states.to(torch.float64)
    for _ in range(length):
        out.append(x)
        x = pendulum_state(x, dt, omega0=omega0, substeps=substeps)
    traj = torch.stack(out, dim=1)
    pos = torch.stack([torch.sin(traj[..., 0]), -torch.cos(traj[..., 0])], dim=-1)
    return pos, traj


def radius_error(positions: Tensor) -> Tensor:
    """| ||p|| - 1 | per token ``(..., T)``: how far each position is off the pendulum's circle."""
    return (positions.norm(dim=-1) - 1).abs()


def pendulum_energy(positions: Tensor, dt: float, *, omega0: float = 1.0) -> Tensor:
    """The energy theta'^2 / 2 + omega0^2 (1 - cos theta) along sequences of positions ``(B, T, 2)``,
    with theta from atan2 and theta' from central differences: ``(B, T - 2)``."""
    theta = torch.atan2(positions[..., 0], -positions[..., 1])
    step = torch.remainder(theta[:, 2:] - theta[:, :-2] + torch.pi, 2 * torch.pi) - torch.pi
    speed = step / (2 * dt)
    return 0.5 * speed**2 + omega0**2 * (1 - torch.cos(theta[:, 1:-1]))


# ---- the causal model with per-token noise levels -------------------------------------------------
class CausalDenoiser(nn.Module):
    """``model(x, t) -> velocity`` for sequences: ``x`` ``(B, T, D)`` noisy tokens, ``t`` ``(B, T)``
    each token's own time. A causal transformer whose adaLN-Zero blocks are conditioned per token
    on embed(t_i); the output at position i depends only on tokens and times 0..i."""

    def __init__(self, token_dim: int, *, dim: int = 64, depth: int = 3, heads: int = 4, max_len: int = 64,
                 t_dim: int = 32):
        super().__init__()
        self.token_dim = check_positive_int(token_dim, "token_dim")
        self.max_len = check_positive_int(max_len, "max_len")
        self.inp = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
        self.embed = SinusoidalTimeEmbedding(t_dim)
        self.time = nn.Sequential(nn.Linear(t_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.transformer = Transformer(dim, depth, heads, cond_dim=dim)
        self.out = nn.Linear(dim, token_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        check_batch(x, ndim=3)
        b, n, d = x.shape
        if d != self.token_dim or n > self.max_len:
            raise ValueError(f"expected x of shape (B, T <= {self.max_len}, {self.token_dim}); got {tuple(x.shape)}")
        if t.shape != (b, n):
            raise ValueError(f"expected t of shape ({b}, {n}), one time per token; got {tuple(t.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError("expected every token's t in [0, 1] (0 = clean, 1 = pure noise)")
        cond = self.time(self.embed(t.reshape(-1)).to(x.dtype)).reshape(b, n, -1)
        h = self.inp(x) + self.pos[:n].to(x.dtype)
        return self.out(self.transformer(h, cond, causal=True))


def _noise_levels(b: int, n: int, mode: str, generator, dtype, device, monotone_share: float = 0.0
                  ) -> tuple[Tensor, Tensor]:
    """Per-token times ``(B, T)`` and which tokens the loss counts, for a training ``mode``."""
    if mode == "independent":  # Diffusion Forcing: every token its own level
        t = torch.rand(b, n, generator=generator, dtype=dtype)
        if monotone_share > 0:  # some sequences get the same levels sorted: near tokens cleaner, as in sampling
            sort = torch.rand(b, 1, generator=generator) < monotone_share
            t = torch.where(sort, t.sort(dim=1).values, t)
        return t.to(device), torch.ones(b, n, dtype=torch.bool, device=device)
    if mode == "full_sequence":  # one level per sequence: a plain sequence diffusion model
        t = torch.rand(b, 1, generator=generator, dtype=dtype).expand(b, n)
        return t.to(device), torch.ones(b, n, dtype=torch.bool, device=device)
    if mode == "teacher_forcing":  # a clean past, one noisy token, an unknown future
        k = torch.randint(0, n, (b, 1), generator=generator)
        i = torch.arange(n)[None]
        t = torch.where(i < k, 0.0, 1.0).to(dtype)
        t = torch.where(i == k, torch.rand(b, 1, generator=generator, dtype=dtype), t)
        return t.to(device), (i == k).to(device)
    raise ValueError(f"unknown noise mode {mode!r}; expected one of {', '.join(NOISE_MODES)}")


def diffusion_forcing_loss(model: Callable, x0: Tensor, path: GaussianPath, *, mode: str = "independent",
                           monotone_share: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """The flow-matching loss of a sequence model on clean sequences ``x0`` ``(B, T, D)`` with
    per-token noise levels drawn by ``mode``: ``"independent"`` (Diffusion Forcing),
    ``"full_sequence"`` (one level for the whole sequence) or ``"teacher_forcing"`` (the past
    clean, one token noisy, the future pure noise; only that token counts).

    ``monotone_share`` (independent mode): the share of sequences whose independent levels are
    sorted to rise along the sequence. With T independent uniform levels a clean past behind a
    noisy token, the pattern that every rollout samples with, has probability ~ 1 / T!; sorting
    some sequences shows the model such patterns without giving up any other."""
    check_batch(x0, ndim=3, name="x0")
    if not 0.0 <= monotone_share <= 1.0:
        raise ValueError(f"expected monotone_share in [0, 1]; got {monotone_share}")
    b, n, d = x0.shape
    t, counted = _noise_levels(b, n, mode, generator, x0.dtype, x0.device, monotone_share)
    eps = gaussian_like(x0, generator)
    flat_x0, flat_eps, flat_t = x0.reshape(b * n, d), eps.reshape(b * n, d), t.reshape(b * n)
    x_t = path.sample(flat_x0, flat_t, eps=flat_eps).x_t.reshape(b, n, d)
    target = conditional_velocity(path, flat_x0, flat_eps, flat_t).reshape(b, n, d)
    err = (model(x_t, t) - target).pow(2).mean(-1)  # (B, T)
    return err[counted].mean()


# ---- sampling ------------------------------------------------------------------------------------
@torch.no_grad()
def sample_diffusion_forcing(model: Callable, context: Tensor, horizon: int, *, path: GaussianPath, steps: int = 20,
                             schedule: str = "pyramid", window: int | None = None, chunk: int | None = None,
                             stabilization: float = 0.02, eta: float = 0.0,
                             generator: torch.Generator | None = None,
                             guidance: Callable[[Tensor], Tensor] | None = None, guidance_scale: float = 0.0,
                             callback: Callable | None = None) -> Tensor:
    """Continue the sequences ``context`` ``(B, C, D)`` (observed: noise level 0) by ``horizon``
    tokens; returns ``(B, C + horizon, D)``.

    Tokens are made ``chunk`` at a time in a sliding window of ``window`` tokens (default: the
    model's ``max_len``; the window holds the last ``window - chunk`` known tokens as context and
    ``chunk`` new ones, default ``window - C``). Each chunk follows :func:`scheduling_matrix`
    (``schedule``, ``steps`` levels), every token moving from its level to the next by
    :func:`posterior_step` (``eta`` = 0 deterministic, 1 ancestral). Context tokens that were
    generated, not observed, are noised to the time ``stabilization`` and given that level.
    ``guidance``: a cost per row of the window's predicted clean tokens ``(B, W, D)``; its gradient
    (times ``guidance_scale``) is subtracted from the x0 prediction of the new tokens.
    ``callback(chunk_index, row, levels, window_tokens)`` after each matrix row.
    """
    check_batch(context, ndim=3, name="context")
    b, c, d = context.shape
    horizon = check_positive_int(horizon, "horizon")
    window = getattr(model, "max_len", None) if window is None else check_positive_int(window, "window")
    if window is None:
        raise ValueError("pass window=, the sequence length the model was trained on")
    if c >= window:
        raise ValueError(f"expected fewer context tokens than the window ({window}); got {c}")
    chunk = window - c if chunk is None else check_positive_int(chunk, "chunk")
    if chunk >= window:
        raise ValueError(f"expected chunk < window ({window}) so that some context stays in view; got {chunk}")
    if not 0.0 <= stabilization < 1.0:
        raise ValueError(f"expected stabilization in [0, 1); got {stabilization}")
    seq = context.clone()
    observed = c  # tokens 0..c-1 are observed; later ones were generated
    made = 0
    for k in range(-(-horizon // chunk)):
        new = min(chunk, horizon - made)
        keep = min(seq.shape[1], window - new)
        ctx = seq[:, seq.shape[1] - keep:]
        start = seq.shape[1] - keep  # index in seq of the window's first token
        t_ctx = torch.zeros(b, keep, dtype=seq.dtype, device=seq.device)
        generated = torch.arange(start, start + keep, device=seq.device) >= observed
        if stabilization > 0 and generated.any():
            t_ctx[:, generated] = stabilization
            flat = ctx[:, generated].reshape(-1, d)
            noisy = path.sample(flat, torch.full((flat.shape[0],), stabilization, dtype=seq.dtype,
                                                 device=seq.device), eps=gaussian_like(flat, generator)).x_t
            ctx = ctx.clone()
            ctx[:, generated] = noisy.reshape(b, -1, d)
        matrix = scheduling_matrix(new, steps, schedule).to(seq.device)
        x = path.prior_sample((b, new, d), generator=generator, dtype=seq.dtype, device=seq.device)
        for m in range(matrix.shape[0] - 1):
            t_new, s_new = matrix[m].to(seq.dtype) / steps, matrix[m + 1].to(seq.dtype) / steps
            tt = torch.cat([t_ctx, t_new.expand(b, new)], dim=1)
            v = model(torch.cat([ctx, x], dim=1), tt)[:, keep:]
            flat_x, flat_v = x.reshape(-1, d), v.reshape(-1, d)
            flat_t, flat_s = t_new.repeat(b), s_new.repeat(b)
            x0_hat, eps_hat = to_x0(flat_v, "velocity", flat_x, flat_t, path), to_eps(flat_v, "velocity", flat_x,
                                                                                    flat_t, path)
            if guidance is not None and guidance_scale:
                x0_hat = _guided_x0(x0_hat, ctx, guidance, guidance_scale, b, new, d)
                a, sig = path.coefficients(flat_t, flat_x)
                moving = (flat_t > 0).reshape(-1, 1)
                eps_hat = torch.where(moving, (flat_x - a * x0_hat) / torch.where(moving, sig, 1.0), eps_hat)
            z = gaussian_like(flat_x, generator) if eta > 0 else None
            x = posterior_step(flat_x, x0_hat, eps_hat, flat_t, flat_s, path, z=z, eta=eta).reshape(b, new, d)
            if callback is not None:
                callback(k, m, matrix[m + 1], torch.cat([ctx, x], dim=1))
        seq = torch.cat([seq, x], dim=1)
        made += new
    return seq


def _guided_x0(x0_hat: Tensor, ctx: Tensor, guidance: Callable, scale: float, b: int, new: int, d: int) -> Tensor:
    with torch.enable_grad():
        x0 = x0_hat.detach().reshape(b, new, d).requires_grad_(True)
        cost = guidance(torch.cat([ctx, x0], dim=1))
        if cost.shape != (b,):
            raise ValueError(f"expected guidance to return one cost per row, shape ({b},); got {tuple(cost.shape)}")
        (grad,) = torch.autograd.grad(cost.sum(), x0)
    return (x0 - scale * grad).detach().reshape(-1, d)
