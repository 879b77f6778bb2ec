"""Chapter 09's text side: a word tokenizer over a closed vocabulary and a small transformer text
encoder (the course's :class:`~course.transformer.Transformer` blocks).

**Tokenizer.** Text is lower-cased and cut into words and single digits (``[a-z]+|[0-9]``;
punctuation is dropped). Every sequence starts with ``<bos>``, so the empty caption is one token,
``[<bos>]``, and the encoder gives it a real embedding: classifier-free guidance's "empty caption"
(Stable Diffusion encodes ""). Sequences are padded with ``<pad>`` to ``max_len`` and carry a mask
(True for real tokens). A word outside the vocabulary becomes ``<unk>``, counted in
``Tokens.unknown`` (word -> count), never dropped; a caption longer than ``max_len`` tokens is
refused with the maximum named, never cut.

**Encoder.** Token embeddings plus fixed sine/cosine positions, a pre-norm transformer with the
padding mask, then the final layer norm: ``tokens`` (B, L, dim), the per-token states that a
denoiser's cross-attention reads, and ``pooled`` (B, dim), their mean over the real tokens (what a
CLIP projection and the U-Net's global conditioning use). Padding changes neither (tested).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .transformer import Transformer, sinusoidal_positions
from .utils import check_positive_int

__all__ = ["PAD", "UNK", "BOS", "SPECIALS", "words", "Tokens", "Tokenizer", "TextEncoder", "masked_mean",
           "word_dropout"]

PAD, UNK, BOS = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<bos>")
_WORD = re.compile(r"[a-z]+|[0-9]")


def words(text: str) -> list[str]:
    """The words of ``text``: lower-cased runs of letters and single digits, punctuation dropped."""
    if not isinstance(text, str):
        raise ValueError(f"expected a caption as a string; got {type(text).__name__}")
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Tokens:
    """Token ids ``(B, L)`` int64, mask ``(B, L)`` bool (True: a real token), unknown words and counts."""

    ids: Tensor
    mask: Tensor
    unknown: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index) -> Tokens:
        return Tokens(self.ids[index], self.mask[index], self.unknown)

    def describe_unknown(self) -> str:
        """One line: how many words became ``<unk>``, and which."""
        total = sum(self.unknown.values())
        if not total:
            return "every word is in the vocabulary"
        listed = ", ".join(f"{w!r} x{n}" for w, n in self.unknown.most_common())
        return f"{total} word(s) outside the vocabulary became <unk>: {listed}"


class Tokenizer:
    """Words to ids over ``vocab`` (ids from 3 on; 0-2 are ``<pad>``, ``<unk>``, ``<bos>``)."""

    def __init__(self, vocab: tuple[str, ...] | list[str], max_len: int = 16):
        vocab = tuple(vocab)
        if len(set(vocab)) != len(vocab) or any(not _WORD.fullmatch(w) for w in vocab):
            raise ValueError("expected a vocabulary of distinct lower-case words or single digits")
        self.vocab = SPECIALS + vocab
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = check_positive_int(max_len, "max_len")
        if self.max_len < 2:
            raise ValueError(f"expected max_len >= 2 (<bos> and one word); got {max_len}")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: list[str] | tuple[str, ...] | str) -> Tokens:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        unknown: Counter = Counter()
        for row, text in enumerate(texts):
            found = words(text)
            if len(found) + 1 > self.max_len:
                raise ValueError(f"caption {row} has {len(found) + 1} tokens with <bos>; the maximum is "
                                 f"{self.max_len}: {text!r}")
            seq = [BOS]
            for word in found:
                if word in self.index:
                    seq.append(self.index[word])
                else:
                    seq.append(UNK)
                    unknown[word] += 1
            ids[row, :len(seq)] = torch.tensor(seq)
        return Tokens(ids, ids != PAD, unknown)

    def decode(self, ids: Tensor) -> list[str]:
        """The words of each row of ``ids``, ``<bos>`` and padding left out."""
        return [" ".join(self.vocab[i] for i in row.tolist() if i not in (PAD, BOS)) for row in ids]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens`` (B, L, D) over the positions where ``mask`` (B, L) is True."""
    weight = mask.to(tokens.dtype)[..., None]
    return (tokens * weight).sum(1) / weight.sum(1).clamp_min(1)


def word_dropout(ids: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """``ids`` with a share ``p`` of the words (not ``<bos>`` or padding) replaced by ``<unk>``: the
    encoder learns an embedding for ``<unk>`` and not to rely on any single word."""
    if not 0 <= p < 1:
        raise ValueError(f"expected 0 <= p < 1; got {p}")
    hit = (torch.rand(ids.shape, generator=generator) < p) & (ids != PAD) & (ids != BOS)
    return torch.where(hit, UNK, ids)


class TextEncoder(nn.Module):
    """``encoder(ids, mask) -> (tokens (B, L, dim), pooled (B, dim))``."""

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 16):
        super().__init__()
        self.vocab_size, self.dim = check_positive_int(vocab_size, "vocab_size"), check_positive_int(dim, "dim")
        self.max_len = check_positive_int(max_len, "max_len")
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.register_buffer("positions", sinusoidal_positions(max_len, dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.shape[1] > self.max_len:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"expected token ids (B, L <= {self.max_len}) int64; got {got}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"expected token ids in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        x = self.embed(ids) + self.positions[:ids.shape[1]]
        tokens = self.transformer(x, key_mask=mask)
        return tokens, masked_mean(tokens, mask)
