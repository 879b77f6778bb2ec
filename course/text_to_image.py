"""Chapter 09: text-to-image in the chapter-08 latent space, two ways.

**Direct text conditioning** (Stable Diffusion's recipe, Rombach et al. 2022):
:class:`TextLatentDiffusion` is a :class:`~course.latent.LatentDiffusion` whose U-Net reads the
frozen text encoder's token states through cross-attention (``context``, ``context_mask``). The
caption is dropped to the empty caption ``[<bos>]`` for a share of training steps, so that one
network also gives the unconditional prediction; guidance (:func:`context_guidance`) is

    v_w(z, t, c) = (1 + w) v(z, t, c) - w v(z, t, c_empty),

the course's CFG (chapter 06) with the empty caption's encoding as the null condition.

**unCLIP** (DALL-E 2, Ramesh et al. 2022), in miniature: a *prior* generates a CLIP image
embedding from the caption's CLIP text embedding (:class:`VectorDenoiser`, a flow on vectors of the
embedding's size), and a *decoder* generates the image from that image embedding (the same latent
U-Net with the embedding as a one-token context; the null condition is the zero vector).
:func:`sample_unclip` chains the two.

Every model here is called ``model(x, t, **cond)`` and sampled with the course's Euler sampler on
the linear path, time from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import KLAutoencoder
from .captions import digit_attributes
from .latent import LatentDiffusion
from .nets import SinusoidalTimeEmbedding
from .ode import sample_flow_euler
from .text import BOS, PAD, TextEncoder, Tokens
from .utils import check_positive_int

__all__ = ["TextLatentDiffusion", "empty_tokens", "drop_captions", "context_guidance", "sample_from_text",
           "VectorDenoiser", "embedding_scale", "sample_vectors", "sample_unclip", "attribute_control"]


def empty_tokens(batch: int, max_len: int) -> Tokens:
    """``batch`` empty captions: ``<bos>`` and padding."""
    ids = torch.full((check_positive_int(batch, "batch"), check_positive_int(max_len, "max_len")), PAD)
    ids[:, 0] = BOS
    return Tokens(ids, ids != PAD)


def drop_captions(tokens: Tokens, p: float, generator: torch.Generator | None = None) -> Tokens:
    """``tokens`` with a share ``p`` of the rows replaced by the empty caption (caption dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"expected 0 <= p < 1; got {p}")
    drop = torch.rand(len(tokens), generator=generator) < p
    empty = empty_tokens(len(tokens), tokens.ids.shape[1])
    ids = torch.where(drop[:, None], empty.ids, tokens.ids)
    return Tokens(ids, ids != PAD, tokens.unknown)


class TextLatentDiffusion(LatentDiffusion):
    """A latent denoiser conditioned on a frozen text encoder's token states.

    ``model(z, t, context=..., context_mask=...)`` is the denoiser; :meth:`encode_text` turns
    :class:`~course.text.Tokens` into that context."""

    def __init__(self, autoencoder: KLAutoencoder, denoiser: nn.Module, text_encoder: TextEncoder):
        super().__init__(autoencoder, denoiser)
        if getattr(denoiser, "context_dim", 0) != text_encoder.dim:
            raise ValueError(f"expected a denoiser with context_dim={text_encoder.dim} (the text encoder's width); "
                             f"got {getattr(denoiser, 'context_dim', 0)}")
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TextLatentDiffusion:
        super().train(mode)
        self.text_encoder.eval()  # frozen, as Stable Diffusion's CLIP text encoder
        return self

    @torch.no_grad()
    def encode_text(self, tokens: Tokens) -> dict[str, Tensor]:
        states, _ = self.text_encoder(tokens.ids, tokens.mask)
        return {"context": states, "context_mask": tokens.mask}


def context_guidance(model: Callable, w: float, null: dict[str, Tensor]) -> Callable:
    """``guided(x, t, **cond)`` = (1 + w) model(x, t, **cond) - w model(x, t, **null), as one batch
    of 2B; ``null`` holds one row per condition tensor (e.g. the empty caption's context and mask),
    repeated for the batch. ``w = 0`` calls the model once."""
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"expected a guidance weight w >= 0; got {w}")

    def guided(x: Tensor, t: Tensor, **cond) -> Tensor:
        if w == 0:
            return model(x, t, **cond)
        if set(cond) != set(null):
            raise ValueError(f"expected the conditions {sorted(null)}; got {sorted(cond)}")
        both = {k: torch.cat([v, null[k].expand(v.shape[0], *null[k].shape[1:])]) for k, v in cond.items()}
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return (1 + w) * c - w * u

    return guided


@torch.no_grad()
def sample_from_text(model: TextLatentDiffusion, tokens: Tokens, *, w: float = 2.0, nfe: int = 20,
                     generator: torch.Generator | None = None, batch: int = 250) -> Tensor:
    """Decoded images, one per caption of ``tokens``: Euler with ``nfe`` steps on the guided
    velocity (2 network evaluations a step when w > 0)."""
    model.eval()
    null = model.encode_text(empty_tokens(1, tokens.ids.shape[1]))
    field = context_guidance(model, w, null)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1)
    out = []
    for start in range(0, len(tokens), batch):
        part = tokens[start:start + batch]
        z1 = torch.randn((len(part), *model.latent_shape), generator=generator)
        out.append(model.decode(sample_flow_euler(field, z1, ts, **model.encode_text(part))))
    return torch.cat(out)


class VectorDenoiser(nn.Module):
    """``model(x, t, cond=c)`` on vectors (B, dim) conditioned on vectors (B, cond_dim): an MLP of
    residual blocks over [x, c, time embedding] (unCLIP's prior, which in DALL-E 2 is a transformer
    over the same inputs)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 256, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.dim, self.cond_dim = check_positive_int(dim, "dim"), check_positive_int(cond_dim, "cond_dim")
        hidden = check_positive_int(hidden, "hidden")
        self.time = nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = nn.Linear(dim + cond_dim + emb_dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden))
                                    for _ in range(check_positive_int(depth, "depth")))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim or cond.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"expected x of shape (B, {self.dim}) and cond of shape (B, {self.cond_dim}); got "
                             f"{tuple(x.shape)} and {tuple(cond.shape)}")
        h = self.inp(torch.cat([x, cond.to(x.dtype), self.time(t.to(x.dtype))], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def embedding_scale(dim: int) -> float:
    """sqrt(dim): a unit vector times this has per-coordinate variance about 1 (the scale a flow
    from N(0, I) suits); the prior generates scaled embeddings."""
    return math.sqrt(check_positive_int(dim, "dim"))


@torch.no_grad()
def sample_vectors(model: Callable, cond: dict[str, Tensor], null: dict[str, Tensor], shape: tuple[int, ...], *,
                   w: float, nfe: int, generator: torch.Generator | None = None) -> Tensor:
    """Euler samples of ``shape`` from a conditional flow ``model(x, t, **cond)`` with guidance ``w``."""
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1)
    return sample_flow_euler(context_guidance(model, w, null), torch.randn(shape, generator=generator), ts, **cond)


@torch.no_grad()
def sample_unclip(prior: VectorDenoiser, decoder: LatentDiffusion, text_emb: Tensor, empty_text_emb: Tensor, *,
                  w_prior: float = 1.0, w: float = 2.0, nfe_prior: int = 20, nfe: int = 20,
                  generator: torch.Generator | None = None, batch: int = 250) -> tuple[Tensor, Tensor]:
    """unCLIP: CLIP text embeddings (B, E) -> prior -> CLIP image embeddings (normalised) ->
    decoder -> images. Returns ``(images, image_embeddings)``."""
    prior.eval(), decoder.eval()
    dim = text_emb.shape[1]
    scaled = sample_vectors(prior, {"cond": text_emb}, {"cond": empty_text_emb.reshape(1, dim)}, tuple(text_emb.shape),
                            w=w_prior, nfe=nfe_prior, generator=generator)
    emb = F.normalize(scaled, dim=1)
    null = {"context": torch.zeros(1, 1, dim), "context_mask": torch.ones(1, 1, dtype=torch.bool)}
    field = context_guidance(decoder, w, null)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1)
    out = []
    for part in emb.split(batch):
        z1 = torch.randn((len(part), *decoder.latent_shape), generator=generator)
        cond = {"context": part[:, None, :], "context_mask": torch.ones(len(part), 1, dtype=torch.bool)}
        out.append(decoder.decode(sample_flow_euler(field, z1, ts, **cond)))
    return torch.cat(out), emb


def attribute_control(generate: Callable[[list[str], torch.Generator], Tensor], *, digits=range(10),
                      templates: tuple[str, ...] | None = None, per_prompt: int = 16, seed: int = 0,
                      class_mean: Tensor | None = None, class_std: Tensor | None = None) -> dict:
    """Do requested attributes move the measured ones? For every digit, attribute and template, the
    prompt pair asking for level -1 and +1 (e.g. "my thin number seven" / "my bold number seven")
    and the bare prompt each get ``per_prompt`` samples from the same noise (``generate(prompts,
    generator)`` with a generator seeded alike for the three), measured by
    :func:`~course.captions.digit_attributes`.

    Returns per attribute the share of pairs whose +1 prompt's mean exceeds the -1 prompt's
    (``direction_*``), the mean difference (``shift_*``) and Spearman's rank correlation between the
    requested level (-1, 0 for the bare prompt, +1) and the measured value, standardised per digit
    by ``class_mean``/``class_std`` (the training digits' attributes; ``rho_*``); ``pairs``."""
    from scipy.stats import spearmanr

    from .captions import ATTRIBUTES, HELD_OUT_TEMPLATES, caption_for

    templates = templates or HELD_OUT_TEMPLATES["described"]
    bare = HELD_OUT_TEMPLATES["bare"][0]
    out: dict = {"pairs": 0, "per_prompt": per_prompt}
    for a, attribute in enumerate(ATTRIBUTES):
        wins, shifts, levels, values = [], [], [], []
        for digit in digits:
            for template in templates:
                measured = {}
                for level in (-1, 0, 1):
                    prompt = (caption_for(digit, {attribute: level}, template=template) if level
                              else caption_for(digit, template=bare))
                    images = generate([prompt] * per_prompt, torch.Generator().manual_seed(seed + digit))
                    value = digit_attributes(images)[:, a]
                    if class_mean is not None:
                        value = (value - class_mean[digit, a]) / class_std[digit, a]
                    measured[level] = value
                    levels += [level] * per_prompt
                    values += value.tolist()
                wins.append(bool(measured[1].mean() > measured[-1].mean()))
                shifts.append(float(measured[1].mean() - measured[-1].mean()))
        out[f"direction_{attribute}"] = sum(wins) / len(wins)
        out[f"shift_{attribute}"] = sum(shifts) / len(shifts)
        out[f"rho_{attribute}"] = float(spearmanr(levels, values).statistic)
        out["pairs"] += len(wins)
    out["direction_all"] = sum(out[f"direction_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)
    return out
