"""Checks for chapter 12 (autoregressive diffusion: MAR and Diffusion Forcing).

Exercise 12.1  ``diffusion_loss(head, tokens, z, eps, t) -> scalar``: MAR's loss with several draws per token
Exercise 12.2  ``reveal_next(mask, order, count) -> boolean pick``: which tokens a MAR step generates
Exercise 12.3  ``pyramid_matrix(horizon, steps) -> int64 matrix``: Diffusion Forcing's pyramid schedule
Exercise 12.4  ``df_step(model, x, k_now, k_next, steps) -> x``: one step with a noise level per token

Every check draws fresh inputs from ``seed`` (heads and causal models with parameters, masks and
orders, horizons and step counts, levels). The course's own ``course.autoregressive`` and
``course.diffusion_forcing`` are not answers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .ch01 import _generator
from .ch07 import _not_the_library
from .verdict import CheckResult, Mismatch, call_student, compare, gradients, matches, run_check


# ---- 12.1 the diffusion loss ---------------------------------------------------------------------
class _Head(nn.Module):
    """A planted head ``head(x, t, z)`` with parameters: a velocity for tokens x given z."""

    def __init__(self, gen: torch.Generator, dim: int, cond: int):
        super().__init__()
        self.mix = nn.Parameter(0.4 * torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        self.cond = nn.Parameter(0.4 * torch.randn(cond, dim, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"head expects t of shape ({x.shape[0]},), one time per row; got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if not isinstance(z, Tensor) or z.shape[0] != x.shape[0]:
            raise ValueError(f"head expects one z per row of x ({x.shape[0]} rows); got "
                             f"{tuple(getattr(z, 'shape', ()))}")
        return torch.tanh(x @ self.mix) * (1 + t[:, None]) + z @ self.cond


def _dloss(head, tokens, z, eps, t, *, order="repeat", z_order="same", sign=1.0, swap=False, reduce="mean",
           target="velocity", first_draw=False) -> Tensor:
    r = eps.shape[0] // tokens.shape[0]
    if first_draw:  # only draw 0 of each token
        eps, t, r = eps[:tokens.shape[0]], t[:tokens.shape[0]], 1
    if order == "repeat":
        x0, zz = tokens.repeat(r, 1), z.repeat(r, 1)
    else:  # repeat_interleave: row j is a draw of token j // r
        x0, zz = tokens.repeat_interleave(r, 0), z.repeat_interleave(r, 0)
    if z_order == "interleave":
        zz = z.repeat_interleave(r, 0)
    tt = t[:, None]
    x_t = tt * x0 + (1 - tt) * eps if swap else (1 - tt) * x0 + tt * eps
    goal = eps if target == "eps" else sign * (eps - x0)
    err = (head(x_t, t, zz) - goal).pow(2)
    return {"mean": err.mean(), "sum": err.sum(1).mean(), "total": err.sum()}[reduce]


def check_diffusion_loss(diffusion_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 12.1: rows k B + i of eps and t are draw k of token i; mean (head(x_t, t, z) - (eps - x))^2."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(diffusion_loss, "diffusion_loss")
        for b, d, c, r in ((6, 4, 5, 3), (5, 2, 3, 1), (4, 16, 8, 4)):
            head = _Head(gen, d, c)
            tokens = torch.randn(b, d, generator=gen, dtype=torch.float64)
            z = torch.randn(b, c, generator=gen, dtype=torch.float64)
            eps = torch.randn(r * b, d, generator=gen, dtype=torch.float64)
            t = 0.02 + 0.96 * torch.rand(r * b, generator=gen, dtype=torch.float64)
            where = f"for {b} tokens of size {d}, z of size {c} and {r} draw(s) per token"
            got = call_student(diffusion_loss, "diffusion_loss", head, tokens.clone(), z.clone(), eps.clone(),
                               t.clone(), where=where)
            if not isinstance(got, Tensor) or got.numel() != 1:
                raise Mismatch(f"diffusion_loss returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} "
                               f"{where}; expected a scalar tensor (the mean over every draw and entry)")
            args = (head, tokens, z, eps, t)
            expected = _dloss(*args)
            compare("diffusion_loss", got.reshape(()), expected.detach(), where=where, mistakes={
                "pairs row j of eps with token j // r (repeat_interleave); row k B + i is draw k of token i, as "
                "tokens.repeat(r, 1) stacks them": _dloss(*args, order="interleave"),
                "uses the target x - eps; on the path x_t = (1 - t) x + t eps the velocity is eps - x":
                    _dloss(*args, sign=-1.0),
                "swaps the path's ends: x_t = (1 - t) x + t eps has the token at t = 0": _dloss(*args, swap=True),
                "sums over each token's entries; the loss is the mean over every entry": _dloss(*args, reduce="sum"),
                "sums over every draw and entry; the loss is their mean": _dloss(*args, reduce="total"),
                "pairs the tokens and their z differently: repeat z exactly as the tokens, so that every draw "
                "sees its own token's z": _dloss(*args, z_order="interleave"),
                "regresses the head onto eps (eps-prediction); on the course's path the head predicts the "
                "velocity eps - x": _dloss(*args, target="eps"),
                "uses only the first draw of each token; average over all r draws (rows k B + i, k = 0..r-1)":
                    _dloss(*args, first_draw=True),
            })
            if not got.requires_grad:
                raise Mismatch(f"diffusion_loss {where} has no gradient path to the head's parameters")
            grads = gradients(got, list(head.parameters()))
            ref = torch.autograd.grad(expected, list(head.parameters()))
            for name, g, want in zip(("mix", "cond"), grads, ref, strict=True):
                if not matches(g, want, rtol=1e-4, atol=1e-8, dtype=got.dtype):
                    raise Mismatch(f"diffusion_loss {where}: the value is right but the gradient with respect to the "
                                   f"head's parameter {name!r} is not (is the head's output detached?)")
        return ("diffusion_loss pairs every draw with its token and z, regresses the head onto eps - x on the linear "
                "path, and trains the head's parameters.")

    return run_check("12.1", "the diffusion loss of a token given z", body)


# ---- 12.2 which tokens a step reveals ------------------------------------------------------------
def _reveal(mask: Tensor, order: Tensor, count: int, *, kind: str = "right") -> Tensor:
    b, n = mask.shape
    if kind == "order-as-rank":
        rank = order
    elif kind == "raster":
        rank = torch.arange(n).expand(b, n)
    else:
        rank = order.argsort(dim=1)
    if kind == "ignore-mask":
        return rank < count
    if kind == "order-as-rank-prefix":  # the known ones are a prefix of the order: ranks below known + count
        return mask & (order < (~mask).sum(dim=1, keepdim=True) + count)
    key = torch.where(mask, rank, n + rank)  # known tokens sort last
    cut = key.sort(dim=1).values[:, count - 1:count]
    return mask & (key <= cut)


def check_reveal_next(reveal_next: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 12.2: the `count` unknown positions that come first in each row's order."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(reveal_next, "reveal_next")
        for b, n in ((6, 9), (4, 49), (3, 5)):
            order = torch.rand(b, n, generator=gen).argsort(dim=1)
            count = int(torch.randint(2, max(3, n // 2), (1,), generator=gen)) if n > 2 else 1
            done = torch.randint(0, n - count + 1, (b,), generator=gen)  # each row: a known prefix of its order
            rank = order.argsort(dim=1)
            mask = rank >= done[:, None]
            where = f"for {b} rows of {n} tokens with {count} to reveal (rows have {done.min()}-{done.max()} known)"
            got = call_student(reveal_next, "reveal_next", mask.clone(), order.clone(), count, where=where)
            if not isinstance(got, Tensor) or got.shape != (b, n) or got.dtype != torch.bool:
                raise Mismatch(f"reveal_next returned {type(got).__name__} "
                               f"{tuple(getattr(got, 'shape', ()))} {getattr(got, 'dtype', '')} {where}; expected a "
                               f"boolean tensor of shape ({b}, {n}), True at the positions to generate now")
            want = _reveal(mask, order, count)
            if torch.equal(got, want):
                continue
            as_rank = ("reads order[b, p] as the rank of position p; order[b, j] is the position generated j-th, "
                       "and its inverse permutation (argsort) gives each position's rank")
            for kind, hint in (
                    ("order-as-rank", as_rank), ("order-as-rank-prefix", as_rank),
                    ("raster", "takes the first unknown positions by index (raster order), not by the row's order"),
                    ("ignore-mask", "takes the first `count` positions of the order even when they are already known; "
                                    "reveal the next ones that are still masked")):
                if torch.equal(got, _reveal(mask, order, count, kind=kind)):
                    raise Mismatch(f"reveal_next {where} {hint}")
            if ((got & ~mask).any()):
                raise Mismatch(f"reveal_next {where} picks a position that is already known (mask False)")
            counts = got.sum(1)
            if not (counts == count).all():
                raise Mismatch(f"reveal_next {where} picks {counts.tolist()} positions per row; expected exactly "
                               f"{count} in every row")
            raise Mismatch(f"reveal_next {where} picks unknown positions, but not the ones that come next in each "
                           "row's order")
        return "reveal_next picks, in every row, the next unknown positions of that row's own random order."

    return run_check("12.2", "which tokens a MAR step reveals", body)


# ---- 12.3 the pyramid scheduling matrix ----------------------------------------------------------
def _pyramid(horizon: int, steps: int, *, reverse=False, clip="both", extra_rows=0) -> Tensor:
    rows = steps + horizon + extra_rows
    m, i = torch.arange(rows)[:, None], torch.arange(horizon)[None, :]
    offset = (horizon - 1 - i) if reverse else i
    k = steps + offset - m
    return {"both": k.clamp(0, steps), "low": k.clamp_min(0), "none": k}[clip]


def check_pyramid_matrix(pyramid_matrix: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 12.3: K[m, i] = clip(steps + i - m, 0, steps), rows m = 0 .. steps + horizon - 1."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(pyramid_matrix, "pyramid_matrix")
        cases = [(1, 1), (5, 3)] + [(int(torch.randint(2, 13, (1,), generator=gen)),
                                     int(torch.randint(2, 21, (1,), generator=gen))) for _ in range(3)]
        for horizon, steps in cases:
            where = f"for horizon {horizon} and {steps} steps"
            got = call_student(pyramid_matrix, "pyramid_matrix", horizon, steps, where=where)
            want = _pyramid(horizon, steps)
            if not isinstance(got, Tensor):
                raise Mismatch(f"pyramid_matrix returned {type(got).__name__} {where}; expected an int64 tensor "
                               f"of shape {tuple(want.shape)}")
            if got.dtype != torch.int64:
                raise Mismatch(f"pyramid_matrix returned {str(got.dtype).replace('torch.', '')} {where}; noise levels "
                               "are integers: expected an int64 tensor")
            if got.ndim == 2 and got.shape[1] == horizon and got.shape[0] != want.shape[0]:
                raise Mismatch(f"pyramid_matrix {where} has {got.shape[0]} rows; expected steps + horizon = "
                               f"{want.shape[0]}: from every token at level {steps} (row 0) to the last token at 0")
            compare("pyramid_matrix", got, want.double(), where=where, rtol=0.0, atol=0.0, mistakes={
                "makes the near tokens noisier than the far ones; in the pyramid each later token is one level "
                "behind the one before it": _pyramid(horizon, steps, reverse=True).double(),
                "does not clip the levels to 0 .. steps": _pyramid(horizon, steps, clip="none").double(),
                "lets the levels of tokens that have not started rise above steps; clip them to steps (pure "
                "noise) as well as to 0": _pyramid(horizon, steps, clip="low").double(),
            })
        return "pyramid_matrix gives the pyramid schedule: each token one level behind the one before, clipped to 0..steps."

    return run_check("12.3", "the pyramid scheduling matrix", body)


# ---- 12.4 one Diffusion Forcing step -------------------------------------------------------------
class _Causal(nn.Module):
    """A planted causal sequence model ``model(x, t)`` on ``(B, T, D)`` with per-token times ``(B, T)``."""

    def __init__(self, gen: torch.Generator, dim: int):
        super().__init__()
        self.mix = nn.Parameter(0.5 * torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        self.time = nn.Parameter(0.5 + torch.rand(dim, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != x.shape[:2]:
            raise ValueError(f"model expects t of shape {tuple(x.shape[:2])}, one time per token; got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if not t.is_floating_point() or t.min() < 0 or t.max() > 1:
            raise ValueError("model expects every token's time in [0, 1]: the level divided by the number of steps")
        past = x.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]  # causal mixing
        return torch.tanh(past @ self.mix) + t[..., None] * self.time


def _df(model, x, k_now, k_next, steps, *, shared=False, call_at_next=False, backwards=False, one_level=False,
        per_token=False):
    t, s = k_now.to(x.dtype) / steps, k_next.to(x.dtype) / steps
    if one_level:  # every moving token one level down, whatever k_next says
        s = torch.where(k_next < k_now, t - 1.0 / steps, t)
    if per_token:  # each token alone: no context from the tokens before it
        v = torch.cat([model(x[:, i:i + 1], t[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
        return x + (s - t)[..., None] * v
    if shared:
        t_call = t.max(dim=1, keepdim=True).values.expand_as(t)
        s = s.max(dim=1, keepdim=True).values.expand_as(s)
        t = t_call
    v = model(x, s.clamp(0, 1) if call_at_next else t.clamp(0, 1))
    step = (t - s) if backwards else (s - t)
    return x + step[..., None] * v


def _compare_step(got, args, where: str) -> None:
    compare("df_step", got, _df(*args), where=where, mistakes={
        "moves every token one level, whatever k_next says; a row change can drop a token by several "
        "levels, to k_next / steps": _df(*args, one_level=True),
        "calls the model on each token alone; the causal model needs the whole window, one call with "
        "every token and its time": _df(*args, per_token=True),
        "gives every token of a sequence the same level; each token has its own, k_now[b, i] / steps":
            _df(*args, shared=True),
        "calls the model at the next levels; it denoises from the current ones, t = k_now / steps":
            _df(*args, call_at_next=True),
        "steps away from the data: going from t to s < t moves by (s - t) v": _df(*args, backwards=True),
    })


def check_df_step(df_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 12.4: t = k_now / steps, s = k_next / steps per token; x + (s - t) v(x, t) (DDIM = Euler on the
    linear path); tokens whose level does not change stay as they are."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(df_step, "df_step")
        for b, n, d, steps in ((3, 6, 2, 5), (2, 9, 4, 20), (4, 3, 3, 1)):
            model = _Causal(gen, d)
            x = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
            k_now = torch.randint(0, steps + 1, (b, n), generator=gen)
            k_now[:, 0] = 0  # a clean first token, as in a rollout's context
            k_now[0, -1] = steps  # some pure noise
            k_next = (k_now - torch.randint(0, 4, (b, n), generator=gen)).clamp_min(0)  # drops of 0 to 3 levels
            where = f"for {b} sequences of {n} tokens of size {d} and {steps} steps"
            got = call_student(df_step, "df_step", model, x.clone(), k_now.clone(), k_next.clone(), steps, where=where)
            args = (model, x, k_now, k_next, steps)
            try:
                _compare_step(got, args, where)
            except Mismatch as m:  # no named mistake: say so when tokens that should stay moved
                generic = str(m).startswith(f"df_step {where}: max |error|")
                if generic and isinstance(got, Tensor) and got.shape == x.shape:
                    still = k_now == k_next
                    if not torch.allclose(got.detach().double()[still], x[still]):
                        raise Mismatch(f"df_step {where} changes tokens whose level does not change "
                                       "(k_next = k_now); those must come out as they went in") from None
                raise
        return ("df_step moves every token from its own level to the next with one call of the causal model, "
                "leaving tokens whose level stays unchanged.")

    return run_check("12.4", "one Diffusion Forcing step with a noise level per token", body)
