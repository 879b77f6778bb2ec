"""Contrastive language-image pre-training (CLIP, Radford et al. 2021) at MNIST scale.

An image tower and a text tower (:class:`~course.text.TextEncoder`) each end in a linear projection
to a shared ``embed_dim``; embeddings are L2-normalised. For a batch of B matched pairs the logits
are ``logits[i, j] = exp(s) <image_i, text_j>`` with a learned log-temperature s (initialised at
log(1 / 0.07) and clamped to log 100, as CLIP does), and the loss is the symmetric InfoNCE

    L = (CE(logits, diag) + CE(logits^T, diag)) / 2,

the average of "which caption is this image's?" and "which image is this caption's?", each a
B-way classification whose right answer is the diagonal.

Uses: zero-shot classification (the class whose prompt embedding is nearest to the image's,
:func:`zero_shot_predict`), retrieval (:func:`retrieval_top1`), and the CLIP score of generated
images (:func:`clip_score`: the cosine between an image's and its caption's embedding, the x axis
of Imagen's trade-off curves).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import TextEncoder, Tokens
from .utils import check_positive_int

__all__ = ["ImageEncoder", "CLIP", "info_nce", "zero_shot_predict", "retrieval_top1", "clip_score",
           "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = math.log(100.0)


class ImageEncoder(nn.Module):
    """A small CNN: 28x28 (or 32x32) -> ``out_dim`` features (two strided stages, then a linear map)."""

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: int = 128):
        super().__init__()
        w = check_positive_int(width, "width")
        self.conv = nn.Sequential(
            nn.Conv2d(check_positive_int(in_channels, "in_channels"), w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(2 * w * 16, check_positive_int(out_dim, "out_dim"))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))


def info_nce(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of ``B`` matched pairs of L2-normalised embeddings (B, E); ``logit_scale``
    is the log-temperature s (logits = exp(s) * cosines)."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"expected image and text embeddings of the same shape (B, E); got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype).exp()
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(image_emb.shape[0], device=image_emb.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIP(nn.Module):
    """Image and text towers with projections to a shared, normalised embedding space."""

    def __init__(self, vocab_size: int, *, embed_dim: int = 64, text_dim: int = 64, text_depth: int = 2,
                 heads: int = 4, max_len: int = 16, image_width: int = 32, in_channels: int = 1):
        super().__init__()
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.image_encoder = ImageEncoder(in_channels, image_width, out_dim=2 * embed_dim)
        self.image_proj = nn.Linear(2 * embed_dim, embed_dim)
        self.text_encoder = TextEncoder(vocab_size, text_dim, text_depth, heads, max_len)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, tokens: Tokens) -> Tensor:
        _, pooled = self.text_encoder(tokens.ids, tokens.mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def loss(self, images: Tensor, tokens: Tokens) -> Tensor:
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE)
        return info_nce(self.encode_image(images), self.encode_text(tokens), scale)


@torch.no_grad()
def zero_shot_predict(clip: CLIP, images: Tensor, prompts: list[Tokens], *, batch: int = 500) -> Tensor:
    """The class of each image: the nearest of the class prompts' embeddings. ``prompts[k]`` holds
    one or several prompts of class k; several are averaged (CLIP's prompt ensembling)."""
    clip.eval()
    classes = torch.stack([F.normalize(clip.encode_text(p).mean(0), dim=-1) for p in prompts])  # (K, E)
    return torch.cat([(clip.encode_image(x) @ classes.T).argmax(1) for x in images.split(batch)])


@torch.no_grad()
def retrieval_top1(clip: CLIP, images: Tensor, tokens: Tokens) -> float:
    """Text -> image retrieval: the share of captions whose most similar image among ``images`` is
    their own (row i of ``tokens`` describes image i)."""
    clip.eval()
    if len(tokens) != images.shape[0]:
        raise ValueError(f"expected one caption per image; got {len(tokens)} captions for {images.shape[0]} images")
    sims = clip.encode_text(tokens) @ clip.encode_image(images).T  # (captions, images)
    return float((sims.argmax(1) == torch.arange(len(tokens))).double().mean())


@torch.no_grad()
def clip_score(clip: CLIP, images: Tensor, tokens: Tokens, *, batch: int = 500) -> Tensor:
    """``(N,)``: the cosine between each image's embedding and its caption's (row i with row i)."""
    clip.eval()
    if len(tokens) != images.shape[0]:
        raise ValueError(f"expected one caption per image; got {len(tokens)} captions for {images.shape[0]} images")
    out = []
    for start in range(0, images.shape[0], batch):
        part = slice(start, start + batch)
        out.append((clip.encode_image(images[part]) * clip.encode_text(tokens[part])).sum(1))
    return torch.cat(out)
