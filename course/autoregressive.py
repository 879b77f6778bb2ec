"""Autoregression over continuous tokens with a diffusion head: MAR (Li, Tian, Li, Deng & He 2024,
"Autoregressive Image Generation without Vector Quantization").

An autoregressive model factorises p(x_1..x_N) into p(x_i | earlier tokens). With discrete tokens
each factor is a softmax over a codebook, which is why images needed vector quantisation. MAR
keeps the tokens continuous: a transformer turns what is known into a vector z_i per unknown
token, and a small **diffusion head** models p(x_i | z_i), trained with the ordinary denoising
loss of that one token given z_i (here the course's flow-matching loss on its Gaussian path):

    L(z, x) = E_{t, eps} || v_theta(x_t, t, z) - (alpha'_t x + sigma'_t eps) ||^2.

The order need not be raster: MAR masks a random subset of tokens in training (a random order,
a mask ratio drawn near 1) and a bidirectional transformer predicts z for every masked token
from the unmasked ones; at sampling it reveals tokens in a random order, a few per step on a
cosine schedule (:func:`reveal_schedule`), each step sampling the revealed tokens with the head.
Raster-order causal autoregression is the same model with causal attention and one token per
step (``order="raster"``).

**Temperature** tau is MAR's quality/diversity knob. There is no softmax to divide: tau scales
the noise that each step of the head's stochastic sampler adds (:func:`posterior_step`),
x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + tau c z; tau = 1 samples the model's own
distribution, tau < 1 concentrates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .conversions import to_eps, to_x0
from .flow_matching import cfm_loss_terms
from .nets import LabelEmbedding, SinusoidalTimeEmbedding
from .paths import GaussianPath
from .samplers import check_decreasing_grid, gaussian_like
from .transformer import Transformer
from .utils import as_time, check_batch, check_positive, check_positive_int

__all__ = ["DiffusionHead", "diffusion_loss", "posterior_step", "sample_head", "reveal_schedule",
           "random_orders", "training_mask", "MAR", "mar_loss", "sample_mar", "ORDERS"]

ORDERS = ("random", "raster")


class _AdaBlock(nn.Module):
    """A residual MLP block whose layer norm is shifted, scaled and gated by the condition (gate
    and modulation start at zero, so the block starts as the identity)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """``head(x, t, z=z) -> velocity``: a small MLP denoiser of one token ``x`` ``(B, D)`` given
    its condition ``z`` ``(B, C)`` and the time ``t`` ``(B,)`` (MAR's SimpleMLPAdaLN at CPU size:
    residual blocks modulated by embed(t) + W z)."""

    def __init__(self, token_dim: int, cond_dim: int, *, hidden: int = 128, depth: int = 3, t_dim: int = 32):
        super().__init__()
        self.token_dim = check_positive_int(token_dim, "token_dim")
        self.cond_dim = check_positive_int(cond_dim, "cond_dim")
        hidden = check_positive_int(hidden, "hidden")
        self.inp = nn.Linear(token_dim, hidden)
        self.embed = SinusoidalTimeEmbedding(t_dim)
        self.time = nn.Linear(t_dim, hidden)
        self.cond = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList(_AdaBlock(hidden) for _ in range(check_positive_int(depth, "depth")))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(hidden, token_dim)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        check_batch(x, trailing=(self.token_dim,))
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        if z is None or z.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"expected z of shape ({x.shape[0]}, {self.cond_dim}); got "
                             f"{None if z is None else tuple(z.shape)}")
        c = self.time(self.embed(t).to(x.dtype)) + self.cond(z)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm(h))


def diffusion_loss(head: Callable, tokens: Tensor, z: Tensor, path: GaussianPath, *, repeats: int = 4,
                   generator: torch.Generator | None = None) -> Tensor:
    """MAR's diffusion loss: the flow-matching loss of ``head`` on each token ``(B, D)`` given its
    ``z`` ``(B, C)``, averaged over ``repeats`` draws of (t, eps) per token (MAR's
    ``diffusion_batch_mul``: the head is cheap next to the transformer that made z)."""
    check_batch(tokens, ndim=2, name="tokens")
    if z.ndim != 2 or z.shape[0] != tokens.shape[0]:
        raise ValueError(f"expected z of shape ({tokens.shape[0]}, C), one per token; got {tuple(z.shape)}")
    repeats = check_positive_int(repeats, "repeats")
    x0, zz = tokens.repeat(repeats, 1), z.repeat(repeats, 1)
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
    eps = gaussian_like(x0, generator)
    return cfm_loss_terms(head, x0, eps, t, path, z=zz).mean()


def posterior_step(x: Tensor, x0_hat: Tensor, eps_hat: Tensor, t, s, path: GaussianPath, *,
                   z: Tensor | None = None, temperature: float = 1.0, eta: float = 1.0) -> Tensor:
    """One step from time t to s < t given the predictions at (x, t): DDIM with ``eta``, written
    from (x0_hat, eps_hat) so that it also starts at t = 1 of the linear path (alpha = 0).

    With eta = 1 it draws from the Gaussian posterior q(x_s | x_t, x_0 = x0_hat), whose variance
    is c^2 = sigma_s^2 (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2); the noise ``z`` is scaled by
    ``temperature`` (MAR's tau): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + tau c z.
    ``t`` and ``s`` are scalars or ``(B,)``; where t == s the row of ``x`` is returned unchanged.
    """
    temperature = check_positive(temperature, "temperature")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"expected eta in [0, 1]; got {eta}")
    t, s = as_time(t, x), as_time(s, x, name="s")
    if (s > t).any():
        raise ValueError("posterior_step goes from t to an earlier time s <= t")
    a_t, s_t = path.coefficients(t, x)
    a_s, s_s = path.coefficients(s, x)
    moving = t > s
    ratio = torch.where(moving.reshape(a_t.shape) if a_t.ndim else moving, a_t * s_s / (a_s * s_t), 1.0)
    c = eta * s_s * torch.sqrt((1 - ratio**2).clamp_min(0.0))
    out = a_s * x0_hat + torch.sqrt((s_s**2 - c**2).clamp_min(0.0)) * eps_hat
    if eta > 0 and bool((c > 0).any()):
        if z is None:
            raise ValueError("posterior_step with eta > 0 needs noise z")
        out = out + temperature * c * z
    keep = (~moving).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(keep, x, out)


def sample_head(head: Callable, z: Tensor, ts: Tensor, *, path: GaussianPath, temperature: float = 1.0,
                generator: torch.Generator | None = None, guidance: float = 0.0, z_null: Tensor | None = None,
                x_init: Tensor | None = None) -> Tensor:
    """Sample one token per row of ``z`` ``(B, C)`` from the velocity head with the stochastic
    :func:`posterior_step` over the decreasing grid ``ts`` (from 1 to 0), its noise scaled by
    ``temperature``. With ``guidance`` w > 0 the velocity is (1 + w) v(z) - w v(z_null)
    (classifier-free guidance, ``z_null`` from the unconditional input). Returns ``(B, D)``."""
    grid = check_decreasing_grid(ts)
    if guidance and z_null is None:
        raise ValueError("guidance > 0 needs z_null, the condition of the unconditional input")
    if z_null is not None and z_null.shape != z.shape:
        raise ValueError(f"expected z_null of shape {tuple(z.shape)} like z; got {tuple(z_null.shape)}")
    dim = head.token_dim if hasattr(head, "token_dim") else None
    if x_init is None:
        if dim is None:
            raise ValueError("pass x_init (B, D) for a head without a token_dim attribute")
        x_init = path.prior_sample((z.shape[0], dim), generator=generator, dtype=z.dtype, device=z.device)
    x = x_init
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        tt = as_time(t, x)
        v = head(x, tt, z=z)
        if guidance:
            v = (1 + guidance) * v - guidance * head(x, tt, z=z_null)
        x0_hat, eps_hat = to_x0(v, "velocity", x, tt, path), to_eps(v, "velocity", x, tt, path)
        noise = gaussian_like(x, generator) if s > 0 else None
        x = posterior_step(x, x0_hat, eps_hat, t, s, path, z=noise, temperature=temperature, eta=1.0 if s > 0 else 0.0)
    return x


# ---- orders, masks and the reveal schedule -------------------------------------------------------
def reveal_schedule(num_tokens: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` sampling steps reveals (MAR's cosine schedule): after step
    k a fraction cos(pi/2 (k + 1) / steps) of the tokens is still masked, at least one token is
    revealed per step and all are revealed at the end. The counts sum to ``num_tokens``."""
    n, steps = check_positive_int(num_tokens, "num_tokens"), check_positive_int(steps, "steps")
    if steps > n:
        raise ValueError(f"expected at most one step per token (steps <= {n}); got steps={steps}")
    counts, masked = [], n
    for k in range(steps):
        left = 0 if k == steps - 1 else math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))
        left = max(min(left, masked - 1), steps - k - 1)  # reveal >= 1 now, keep >= 1 per later step
        counts.append(masked - left)
        masked = left
    return counts


def random_orders(batch: int, num_tokens: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """One random permutation of ``0..num_tokens - 1`` per row: ``(batch, num_tokens)`` int64."""
    keys = torch.rand(check_positive_int(batch, "batch"), check_positive_int(num_tokens, "num_tokens"),
                      generator=generator)
    return keys.argsort(dim=1).to(device)


def training_mask(batch: int, num_tokens: int, *, min_ratio: float = 0.7,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """MAR's training mask ``(batch, num_tokens)``, True = masked (to be predicted): per row a mask
    ratio r from a normal centred at 1 with std 0.25, truncated to [min_ratio, 1], and the first
    ceil(r N) tokens of a random order masked (at least one)."""
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"expected min_ratio in (0, 1]; got {min_ratio}")
    std = 0.25
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    lo = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / std, dtype=torch.float64))  # P(N < lower end)
    ratio = 1.0 + std * torch.special.ndtri(lo + u * (0.5 - lo))  # inverse CDF on [min_ratio, 1]
    n_masked = torch.ceil(ratio * num_tokens).clamp(1, num_tokens).long()
    rank = random_orders(batch, num_tokens, generator=generator).argsort(dim=1)  # rank of each position
    return (rank < n_masked[:, None]).to(device)


# ---- the model -----------------------------------------------------------------------------------
class MAR(nn.Module):
    """A masked autoregressive model over ``num_tokens`` continuous tokens of size ``token_dim``.

    ``condition(tokens, mask, y)`` gives z ``(B, N, dim)`` for every position from a transformer
    over [label token, token embeddings + positions], where masked tokens (``mask`` True) are
    replaced by a learned mask embedding (``order="random"``, bidirectional); with
    ``order="raster"`` attention is causal and position i sees tokens 0..i-1 (the input shifted
    right), so z_i never depends on token i or later. ``head`` is the :class:`DiffusionHead`.
    ``num_classes``: class-conditional with a null label for classifier-free guidance.
    """

    def __init__(self, num_tokens: int, token_dim: int, *, dim: int = 64, depth: int = 4, heads: int = 4,
                 num_classes: int | None = None, order: str = "random", head_hidden: int = 128,
                 head_depth: int = 3):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; expected one of {', '.join(ORDERS)}")
        self.num_tokens = check_positive_int(num_tokens, "num_tokens")
        self.token_dim = check_positive_int(token_dim, "token_dim")
        self.order, self.causal = order, order == "raster"
        self.inp = nn.Linear(token_dim, dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(dim))
        self.pos = nn.Parameter(0.02 * torch.randn(num_tokens + 1, dim))
        self.num_classes = num_classes
        self.label = LabelEmbedding(num_classes, dim) if num_classes is not None else None
        self.start = nn.Parameter(0.02 * torch.randn(dim))  # the label slot of an unconditional model
        self.transformer = Transformer(dim, depth, heads)
        self.head = DiffusionHead(token_dim, dim, hidden=head_hidden, depth=head_depth)

    def condition(self, tokens: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        check_batch(tokens, ndim=3, name="tokens")
        b, n, d = tokens.shape
        if (n, d) != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected tokens of shape (B, {self.num_tokens}, {self.token_dim}); got "
                             f"{tuple(tokens.shape)}")
        h = self.inp(tokens)
        if self.causal:  # position i gets token i - 1 (position 0: the mask embedding)
            h = torch.cat([self.mask_token.expand(b, 1, -1), h[:, :-1]], dim=1)
        else:
            if mask is None or mask.shape != (b, n) or mask.dtype != torch.bool:
                raise ValueError(f"expected a boolean mask of shape ({b}, {n}) (True = masked); got "
                                 f"{None if mask is None else (tuple(mask.shape), mask.dtype)}")
            h = torch.where(mask[..., None], self.mask_token.to(h.dtype), h)
        if self.label is not None:
            first = self.label(y, b)[:, None]
        elif y is not None:
            raise ValueError("this MAR is unconditional (num_classes=None); got labels y")
        else:
            first = self.start.expand(b, 1, -1)
        seq = torch.cat([first.to(h.dtype), h], dim=1) + self.pos.to(h.dtype)
        return self.transformer(seq, causal=self.causal)[:, 1:]


def mar_loss(model: MAR, tokens: Tensor, path: GaussianPath, *, y: Tensor | None = None, repeats: int = 4,
             min_ratio: float = 0.7, generator: torch.Generator | None = None) -> Tensor:
    """The training loss of :class:`MAR` on a batch of token sequences ``(B, N, D)``: a random
    :func:`training_mask` (random order) or every token (raster order, each from its past), z from
    the transformer, and the :func:`diffusion_loss` of the head on the predicted tokens."""
    b, n = tokens.shape[:2]
    if model.causal:
        mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    else:
        mask = training_mask(b, n, min_ratio=min_ratio, generator=generator, device=tokens.device)
    z = model.condition(tokens, mask, y)
    return diffusion_loss(model.head, tokens[mask], z[mask], path, repeats=repeats, generator=generator)


@torch.no_grad()
def sample_mar(model: MAR, n: int, *, steps: int, path: GaussianPath, y: Tensor | None = None,
               guidance: float = 0.0, temperature: float = 1.0, head_steps: int = 20,
               generator: torch.Generator | None = None, callback: Callable | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Generate ``n`` token sequences ``(n, N, D)`` with ``steps`` autoregressive steps.

    Random order: each row gets a random order; step k reveals the next :func:`reveal_schedule`
    count of its tokens, sampled by the head from z of the tokens revealed so far. Raster order:
    ``steps`` must equal N (one token per step, left to right). ``guidance`` w: classifier-free
    guidance in the head (labels ``y`` against the null label). ``callback(k, tokens, mask)``
    after each step (``mask``: still unknown). Runs on ``device``, by default the model's.
    """
    n = check_positive_int(n, "n")
    if device is None:
        device = next(model.parameters()).device
    big_n, d = model.num_tokens, model.token_dim
    if model.causal and steps != big_n:
        raise ValueError(f"raster order generates one token per step: expected steps={big_n}; got {steps}")
    counts = reveal_schedule(big_n, steps)
    if guidance and model.label is None:
        raise ValueError("guidance needs a class-conditional MAR (num_classes set)")
    tokens = torch.zeros(n, big_n, d, dtype=dtype, device=device)
    mask = torch.ones(n, big_n, dtype=torch.bool, device=device)
    order = torch.arange(big_n, device=device).expand(n, -1) if model.causal else \
        random_orders(n, big_n, generator=generator, device=device)
    rank = order.argsort(dim=1)
    grid = torch.linspace(1.0, 0.0, check_positive_int(head_steps, "head_steps") + 1, dtype=torch.float64)
    done = 0
    for k, count in enumerate(counts):
        z = model.condition(tokens, mask, y)
        pick = mask & (rank < done + count)  # the next `count` tokens of each row's order
        z_null = model.condition(tokens, mask, None)[pick] if guidance else None
        tokens[pick] = sample_head(model.head, z[pick], grid, path=path, temperature=temperature,
                                   generator=generator, guidance=guidance, z_null=z_null).to(dtype)
        mask = mask & ~pick
        done += count
        if callback is not None:
            callback(k, tokens.clone(), mask.clone())
    return tokens
