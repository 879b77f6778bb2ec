"""Chapter 12's recipes: MAR on the chapter-08 latent space and Diffusion Forcing on the pendulum.

- ``mnist_mar`` (kind ``mar``): a class-conditional :class:`~course.autoregressive.MAR` whose 49
  tokens are the 4-channel latent pixels of the shipped ``mnist_autoencoder`` (4x7x7, one token per
  latent position), random order, 10 % label dropout (CFG in the diffusion head). The training
  digits are encoded once; the checkpoint holds the autoencoder too. Metrics (as every generator
  reports: class accuracy, MNIST-FD beside its floor, diversity) at the recipe's autoregressive
  steps, guidance and temperature, plus tokens per second.
- ``mnist_mar_raster``: the same model with causal attention in raster order (one token per step,
  49 steps): classic autoregression over continuous tokens.
- ``pendulum_df`` (kind ``diffusion_forcing``): a :class:`~course.diffusion_forcing.CausalDenoiser`
  on 16-token pendulum sequences with independent per-token noise levels; ``pendulum_tf``: the
  same network trained with teacher forcing (clean past, one noisy token). Metrics: rollouts of
  held-out sequences from 4 observed tokens to 4x the training horizon, the error of the energy
  read off the positions (against the simulator's true energy) and the distance from the circle,
  in the horizon and in the last quarter, at the recipe's sampling settings.

Pendulum data (``data="pendulum"``) is simulated, not downloaded: 6 000 training and 200 held-out
sequences from their own seeds (:func:`pendulum_data`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .autoencoder import KLAutoencoder
from .autoregressive import MAR, mar_loss, sample_mar
from .diffusion_forcing import (
    CausalDenoiser,
    diffusion_forcing_loss,
    pendulum_energy,
    radius_error,
    sample_diffusion_forcing,
    simulate_pendulum,
)
from .image_recipes import PATH, drop_labels, eval_labels, sample_metrics
from .latent import sample_latents
from .latent_recipes import _build_ae, _latent_dataset, _latent_parts, _prepare_latent
from .recipe_registry import (
    DATASETS,
    Recipe,
    RecipeKind,
    get_recipe,
    register_kind,
    register_recipe,
)
from .transformer import patchify, unpatchify
from .utils import check_positive_int

__all__ = ["LatentMAR", "SequenceData", "pendulum_data", "rollout_metrics", "PENDULUM_DT", "PENDULUM_LENGTH"]

PENDULUM_DT, PENDULUM_LENGTH = 0.3, 16


# ---- MAR on the latent space ---------------------------------------------------------------------
class LatentMAR(nn.Module):
    """A :class:`MAR` over the tokens of an autoencoder's scaled latents (one token per latent
    position, its channels the token), with the frozen autoencoder to decode."""

    def __init__(self, autoencoder: KLAutoencoder, mar: MAR):
        super().__init__()
        c, h, w = autoencoder.latent_shape
        if (mar.num_tokens, mar.token_dim) != (h * w, c):
            raise ValueError(f"expected a MAR over {h * w} tokens of size {c} (the {c}x{h}x{w} latent); got "
                             f"{mar.num_tokens} tokens of size {mar.token_dim}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.mar = mar

    def train(self, mode: bool = True) -> LatentMAR:
        super().train(mode)
        self.autoencoder.eval()
        return self

    def tokens(self, latents: Tensor) -> Tensor:
        return patchify(latents, 1)

    def latents(self, tokens: Tensor) -> Tensor:
        return unpatchify(tokens, 1, self.autoencoder.latent_shape)

    @torch.no_grad()
    def sample(self, labels: Tensor, *, steps: int, guidance: float = 1.0, temperature: float = 1.0,
               head_steps: int = 20, generator: torch.Generator | None = None, batch: int = 500,
               callback=None) -> Tensor:
        """Decoded class-conditional samples ``(len(labels), C, H, W)``."""
        out = []
        for y in labels.split(check_positive_int(batch, "batch")):
            tok = sample_mar(self.mar, y.shape[0], steps=steps, path=PATH, y=y, guidance=guidance,
                             temperature=temperature, head_steps=head_steps, generator=generator, callback=callback)
            out.append(self.autoencoder.decode(self.latents(tok)))
        return torch.cat(out)


def _build_mar(recipe: Recipe) -> nn.Module:
    _, ae = _latent_parts(recipe)
    c, h, w = ae.latent_shape
    mar = MAR(h * w, c, dim=int(recipe.option("dim")), depth=int(recipe.option("depth")), heads=4, num_classes=10,
              order=recipe.option("order"), head_hidden=int(recipe.option("head_hidden")), head_depth=3)
    return LatentMAR(ae, mar)


def _mar_loss(recipe, model, context):
    repeats = int(recipe.option("repeats"))

    def loss(model, batch, g):
        moments, y = batch
        tokens = model.tokens(sample_latents(moments, generator=g))
        return mar_loss(model.mar, tokens, PATH, y=drop_labels(y, recipe.label_dropout, g), repeats=repeats,
                        generator=g)
    return loss


def mar_settings(recipe: Recipe) -> dict:
    """The sampling settings a MAR recipe reports its metrics at (raster order: one step per token)."""
    steps = int(recipe.option("ar_steps"))
    if recipe.option("order") == "raster":
        _, h, w = _build_ae(get_recipe(recipe.option("autoencoder"))).latent_shape
        steps = h * w
    return {"steps": steps, "guidance": recipe.eval_w, "temperature": float(recipe.option("temperature")),
            "head_steps": int(recipe.option("head_steps"))}


@torch.no_grad()
def _mar_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(1)
    labels = eval_labels(fast)
    settings = mar_settings(recipe)
    if fast:
        settings["head_steps"] = 2
    start = time.perf_counter()
    samples = model.sample(labels, generator=gen, **settings)
    seconds = time.perf_counter() - start
    out = {"ar_steps": settings["steps"], "w": settings["guidance"], "temperature": settings["temperature"],
           "head_steps": settings["head_steps"], "encode_seconds": round(context["encode_seconds"], 2)}
    # a head step evaluates the conditional and the unconditional z (2 NFE with w > 0), for every token
    out.update(sample_metrics(classifier, samples, labels, held_out, seconds, settings["head_steps"]
                              * (2 if settings["guidance"] else 1), generator=gen, data=recipe.data))
    out["tokens_per_second"] = out["samples_per_second"] * model.mar.num_tokens
    return out


# ---- Diffusion Forcing on the pendulum -----------------------------------------------------------
@dataclass(frozen=True)
class SequenceData:
    """Sequences ``(N, T, D)`` (named ``images`` for the recipe machinery), dummy labels ``(N,)``,
    the true states ``(N, T, 2)`` and a description of the data."""

    images: Tensor
    labels: Tensor
    states: Tensor
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]


def pendulum_data(split: str, *, verbose: bool = True, length: int | None = None) -> SequenceData:
    """Simulated pendulum sequences: 6 000 of ``PENDULUM_LENGTH`` tokens for ``"train"`` (seed 0),
    200 of 4 x ``PENDULUM_LENGTH`` for ``"test"`` (seed 99), one token every ``PENDULUM_DT``."""
    if split not in ("train", "test"):
        raise ValueError(f"expected split 'train' or 'test'; got {split!r}")
    n, seed = (6000, 0) if split == "train" else (200, 99)
    length = length or (PENDULUM_LENGTH if split == "train" else 4 * PENDULUM_LENGTH)
    pos, states = simulate_pendulum(n, length, dt=PENDULUM_DT, generator=torch.Generator().manual_seed(seed))
    source = f"simulated pendulum, {n} sequences of {length} tokens every {PENDULUM_DT} (seed {seed})"
    if verbose:
        print(f"{split}: {source}")
    return SequenceData(pos.float(), torch.zeros(n, dtype=torch.long), states, source)


def _build_df(recipe: Recipe) -> nn.Module:
    return CausalDenoiser(2, dim=int(recipe.option("dim")), depth=int(recipe.option("depth")), heads=4,
                          max_len=PENDULUM_LENGTH)


def _df_loss(recipe, model, context):
    mode, share = recipe.option("noise"), float(recipe.option("monotone_share", 0.0))

    def loss(model, batch, g):
        (x,) = batch
        return diffusion_forcing_loss(model, x, PATH, mode=mode, monotone_share=share, generator=g)
    return loss


def _df_dataset(recipe, images, labels, context) -> tuple:
    return (images,)


def df_settings(recipe: Recipe) -> dict:
    """The sampling settings a Diffusion Forcing recipe reports its rollouts at."""
    return {"schedule": recipe.option("schedule"), "chunk": int(recipe.option("chunk")),
            "stabilization": float(recipe.option("stabilization")), "steps": int(recipe.option("sample_steps"))}


@torch.no_grad()
def rollout_metrics(model: nn.Module, held_out: SequenceData, *, context: int = 4, generator=None,
                    **settings) -> dict:
    """Roll the held-out sequences out from ``context`` observed tokens to their full length (4x the
    training horizon) and compare with the simulator: the energy error |E(rollout) - E(truth)| (the
    energy read off positions by central differences) and the radius error, averaged over the
    tokens generated inside the training horizon and over the last quarter; plus the mean distance
    from the true positions."""
    truth = held_out.images.double()
    n, length = truth.shape[:2]
    start = time.perf_counter()
    out = sample_diffusion_forcing(model, held_out.images[:, :context], length - context, path=PATH,
                                   generator=generator, **settings).double()
    seconds = time.perf_counter() - start
    states = held_out.states
    true_energy = 0.5 * states[:, 0, 1] ** 2 + (1 - torch.cos(states[:, 0, 0]))
    energy = (pendulum_energy(out, PENDULUM_DT) - true_energy[:, None]).abs()  # token i + 1 for column i
    radius = radius_error(out)
    distance = (out - truth).norm(dim=-1)
    inside, last = slice(context, PENDULUM_LENGTH), slice(length - length // 4, length)
    e_in, e_far = energy[:, inside.start - 1:inside.stop - 1].mean(), energy[:, last.start - 1:last.stop - 2].mean()
    return {"rollouts": n, "rollout_tokens": length, "energy_error_in_horizon": float(e_in),
            "energy_error_last_quarter": float(e_far), "energy_error_ratio": float(e_far / e_in),
            "radius_error_in_horizon": float(radius[:, inside].mean()),
            "radius_error_last_quarter": float(radius[:, last].mean()),
            "distance_in_horizon": float(distance[:, inside].mean()),
            "distance_last_quarter": float(distance[:, last].mean()),
            "tokens_per_second": n * (length - context) / seconds}


def _df_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    model.eval()
    settings = df_settings(recipe)
    if fast:
        settings["steps"] = 2
        held_out = SequenceData(held_out.images[:8], held_out.labels[:8], held_out.states[:8], held_out.source)
    out = {f"sample_{k}": v for k, v in settings.items()}
    out.update(rollout_metrics(model, held_out, generator=torch.Generator().manual_seed(1), **settings))
    return out


DATASETS["pendulum"] = pendulum_data
register_kind("mar", RecipeKind(_build_mar, _mar_loss, _mar_metrics, _prepare_latent, needs_classifier=True,
                                dataset=_latent_dataset))
register_kind("diffusion_forcing", RecipeKind(_build_df, _df_loss, _df_metrics, dataset=_df_dataset))
_MAR_OPTIONS = (("autoencoder", "mnist_autoencoder"), ("dim", 96), ("depth", 4), ("head_hidden", 128),
                ("repeats", 2), ("ar_steps", 16), ("temperature", 1.0), ("head_steps", 20))
register_recipe(Recipe(
    "mnist_mar", "mar", steps=1600, batch_size=128, lr=1e-3, fast_steps=3,
    options=(*_MAR_OPTIONS, ("order", "random")),
    description="MAR: random-order masked autoregression over the 49 latent tokens of mnist_autoencoder with a "
                "diffusion head, 10% label dropout (CFG)"))
register_recipe(Recipe(
    "mnist_mar_raster", "mar", steps=1600, batch_size=128, lr=1e-3, fast_steps=3,
    options=(*_MAR_OPTIONS, ("order", "raster")),
    description="raster-order causal autoregression over the same tokens, same diffusion head"))
_DF_OPTIONS = (("dim", 64), ("depth", 3), ("schedule", "pyramid"), ("chunk", 8), ("stabilization", 0.02),
               ("sample_steps", 20))
register_recipe(Recipe(
    "pendulum_df", "diffusion_forcing", steps=6000, batch_size=128, lr=1e-3, fast_steps=3, data="pendulum",
    options=(*_DF_OPTIONS, ("noise", "independent"), ("monotone_share", 0.5)),
    description="Diffusion Forcing: causal transformer, independent per-token noise levels (half of the sequences "
                "with their levels sorted), on 16-token pendulum sequences"))
register_recipe(Recipe(
    "pendulum_tf", "diffusion_forcing", steps=6000, batch_size=128, lr=1e-3, fast_steps=3, data="pendulum",
    options=(("dim", 64), ("depth", 3), ("schedule", "autoregressive"), ("chunk", 1), ("stabilization", 0.0),
             ("sample_steps", 20), ("noise", "teacher_forcing")),
    description="the teacher-forcing baseline: the same network, clean past and one noisy token in training"))
