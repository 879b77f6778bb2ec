"""The course's transformer blocks, shared by every sequence model of the later chapters: MAR's
bidirectional transformer and Diffusion Forcing's causal one (chapter 12), the text encoder and
the U-Net's cross-attention of chapter 09, and DiT in chapter 10.

A block is pre-norm attention plus an MLP (Vaswani et al. 2017; the GPT-2 / ViT layout). With a
conditioning vector it uses **adaLN-Zero** (Peebles & Xie 2023, DiT): the layer norms carry no
affine parameters of their own; a linear map of the condition gives a shift, a scale and a gate
for each of the two branches, and that map starts at zero, so every block is the identity at
initialisation (tested) and training starts from the unconditioned residual stream.

    h = x + gate_1 * Attn(LN(x) * (1 + scale_1) + shift_1)
    y = h + gate_2 * MLP(LN(h) * (1 + scale_2) + shift_2)

The condition is one vector per sequence ``(B, C)`` (a time or class embedding) or one per token
``(B, N, C)`` (Diffusion Forcing's per-token noise level). ``causal=True`` masks attention to
earlier positions only: the output at position i depends on inputs 0..i and on nothing later, bit
for bit (tested).

``key_mask`` (B, N), True for real tokens, keeps padding out of attention (the text encoder of
chapter 09 pads captions to one length); :class:`CrossAttention` lets queries (image tokens) read
a context of other tokens (the caption's), with the same padding mask on the context.

Tokens of an image: :func:`patchify` cuts ``(B, C, H, W)`` into ``(B, N, C p^2)`` patches in
raster order and :func:`unpatchify` puts them back (exact inverses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import check_positive_int

__all__ = ["Attention", "CrossAttention", "TransformerBlock", "Transformer", "sinusoidal_positions", "patchify", "unpatchify"]


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, N, dim)``, optionally causal."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        dim, heads = check_positive_int(dim, "dim"), check_positive_int(heads, "heads")
        if dim % heads:
            raise ValueError(f"expected dim divisible by heads; got dim={dim}, heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, causal: bool = False, key_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if causal:  # an explicit boolean mask: True where attention is allowed (key <= query)
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:  # padding: no query attends to a padded key
            keys = _key_mask(key_mask, b, n)
            mask = keys if mask is None else mask & keys
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d / heads)
        return self.out(h.transpose(1, 2).reshape(b, n, d))


def _key_mask(mask: Tensor, batch: int, n: int) -> Tensor:
    """A ``(B, N)`` boolean mask (True: a real token) as ``(B, 1, 1, N)`` for attention; every row
    needs one real token (attention over no key at all is undefined)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"expected a boolean mask of shape ({batch}, {n}) (True for real tokens); got {got}")
    if not bool(mask.any(1).all()):
        raise ValueError("expected at least one real token (mask True) in every sequence; got a row of padding only")
    return mask[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` (B, N, dim) to a context (B, L, context_dim), e.g.
    image tokens reading text tokens (Stable Diffusion's conditioning), with a padding mask on the
    context. Keys and values are projections of the context only, so padded context tokens change
    nothing (tested)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        dim, heads = check_positive_int(dim, "dim"), check_positive_int(heads, "heads")
        if dim % heads:
            raise ValueError(f"expected dim divisible by heads; got dim={dim}, heads={heads}")
        self.heads, self.context_dim = heads, check_positive_int(context_dim, "context_dim")
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(f"expected a context of shape ({b}, L, {self.context_dim}); got {tuple(context.shape)}")
        length, hd = context.shape[1], d // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv(context).reshape(b, length, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else _key_mask(context_mask, b, length)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP; with ``cond_dim`` the adaLN-Zero form (identity at init)."""

    def __init__(self, dim: int, heads: int = 4, *, mlp_ratio: float = 4.0, cond_dim: int | None = None):
        super().__init__()
        affine = cond_dim is None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = None
        if cond_dim is not None:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(check_positive_int(cond_dim, "cond_dim"), 6 * dim))
            nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: shift = scale = gate = 0 at init
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, cond: Tensor | None = None, *, causal: bool = False,
                key_mask: Tensor | None = None) -> Tensor:
        if self.ada is None:
            if cond is not None:
                raise ValueError("this block has no conditioning (cond_dim=None); got cond")
            x = x + self.attn(self.norm1(x), causal=causal, key_mask=key_mask)
            return x + self.mlp(self.norm2(x))
        if cond is None:
            raise ValueError("this block is conditioned (adaLN-Zero); expected cond of shape (B, C) or (B, N, C)")
        mod = self.ada(cond)
        if mod.ndim == 2:  # one condition per sequence
            mod = mod[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, causal=causal, key_mask=key_mask)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` and a final layer norm over ``(B, N, dim)``."""

    def __init__(self, dim: int, depth: int, heads: int = 4, *, mlp_ratio: float = 4.0,
                 cond_dim: int | None = None):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, cond_dim=cond_dim)
                                    for _ in range(check_positive_int(depth, "depth")))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, cond: Tensor | None = None, *, causal: bool = False,
                key_mask: Tensor | None = None) -> Tensor:
        """``key_mask`` (B, N) boolean, True for real tokens: padded positions are never attended to,
        so the outputs at real positions do not depend on the padding (their own outputs are
        computed but meaningless)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}); got {tuple(x.shape)}")
        if cond is not None and (cond.shape[0] != x.shape[0] or cond.ndim == 3 and cond.shape[1] != x.shape[1]):
            raise ValueError(f"expected cond of shape ({x.shape[0]}, C) or ({x.shape[0]}, {x.shape[1]}, C); "
                             f"got {tuple(cond.shape)}")
        for block in self.blocks:
            x = block(x, cond, causal=causal, key_mask=key_mask)
        return self.norm(x)


def sinusoidal_positions(n: int, dim: int) -> Tensor:
    """Fixed sine/cosine position codes ``(n, dim)`` (Vaswani et al. 2017): position p, pair i gets
    sin and cos of p / 10000^(2i / dim)."""
    n, dim = check_positive_int(n, "n"), check_positive_int(dim, "dim")
    if dim % 2:
        raise ValueError(f"expected an even dim; got {dim}")
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.zeros(n, dim, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out.float()


def patchify(x: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), C p^2)``: non-overlapping p x p patches in raster order
    (row by row), each flattened channel-first."""
    patch = check_positive_int(patch, "patch")
    if x.ndim != 4 or x.shape[2] % patch or x.shape[3] % patch:
        raise ValueError(f"expected images (B, C, H, W) with H and W divisible by the patch size {patch}; "
                         f"got {tuple(x.shape)}")
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, patch: int, shape: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`patchify`: ``(B, N, C p^2)`` -> ``(B, C, H, W)`` for ``shape = (C, H, W)``."""
    patch = check_positive_int(patch, "patch")
    c, h, w = shape
    n, d = (h // patch) * (w // patch), c * patch * patch
    if h % patch or w % patch or tokens.ndim != 3 or tokens.shape[1:] != (n, d):
        raise ValueError(f"expected tokens of shape (B, {n}, {d}) for images {tuple(shape)} in {patch}x{patch} "
                         f"patches; got {tuple(tokens.shape)}")
    x = tokens.reshape(tokens.shape[0], h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(tokens.shape[0], c, h, w)
