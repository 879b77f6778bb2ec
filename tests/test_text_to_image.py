"""Chapter 09's modules: attributes, captions, tokenizer, text encoder, CLIP's loss, cross-attention
conditioning, guidance with the empty caption and the unCLIP prior (course/captions.py, text.py,
clip.py, text_to_image.py, the U-Net's context)."""

import math

import pytest
import torch

from course.captions import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    AttributeScale,
    caption_for,
    digit_attributes,
    make_captions,
    vocabulary,
)
from course.clip import CLIP, clip_score, info_nce, retrieval_top1, zero_shot_predict
from course.flow_matching import cfm_loss
from course.paths import LinearPath
from course.text import (
    BOS,
    PAD,
    UNK,
    TextEncoder,
    Tokenizer,
    Tokens,
    masked_mean,
    word_dropout,
    words,
)
from course.text_to_image import (
    VectorDenoiser,
    context_guidance,
    drop_captions,
    empty_tokens,
    sample_vectors,
)
from course.transformer import CrossAttention, Transformer
from course.unet import SpatialCrossAttention, UNet


# ---- attributes on drawn images with known values ------------------------------------------------
def _canvas(n=1):
    return -torch.ones(n, 1, 28, 28, dtype=torch.float64)


def _bar(width, length, top=4, left=6):
    x = _canvas()
    x[0, 0, top:top + length, left:left + width] = 1.0
    return x


@pytest.mark.parametrize("w, length", [(1, 20), (2, 18), (3, 15), (5, 10)])
def test_thickness_of_a_bar_is_wl_over_l_plus_w(w, length):
    # vertical bar: area w L, total variation (perimeter) 2 L + 2 w
    thickness, slant, width = digit_attributes(_bar(w, length))[0].tolist()
    assert thickness == pytest.approx(w * length / (length + w), rel=1e-12)
    assert slant == pytest.approx(0.0, abs=1e-12) and width == w


@pytest.mark.parametrize("shear", [-1, 0, 1, 2])
def test_slant_of_a_sheared_bar_is_its_shear(shear):
    # row r (counted downwards) holds 3 pixels starting at column c0 - shear * r: going up by one
    # row moves the stroke `shear` pixels to the right
    x, rows = _canvas(), 8
    for r in range(rows):
        c = 12 - shear * (r - rows // 2)
        x[0, 0, 6 + r, c:c + 3] = 1.0
    assert digit_attributes(x)[0, 1].item() == pytest.approx(shear, abs=1e-12)


def test_blank_images_and_bad_input():
    assert digit_attributes(_canvas(2)).tolist() == [[0.0, 0.0, 0.0]] * 2
    with pytest.raises(ValueError, match=r"expected grey images \(N, 1, H, W\)"):
        digit_attributes(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="expected grey images"):
        digit_attributes(torch.zeros(2, 1, 28, 28, dtype=torch.long))


def test_tertile_levels_split_each_class_in_thirds():
    imgs, labels = [], []
    for c in range(2):
        for w in range(1, 10):
            imgs.append(_bar(w, 12 + c))
            labels.append(c)
    images, labels = torch.cat(imgs).float(), torch.tensor(labels)
    scale = AttributeScale.fit(images, labels, classes=2)
    levels = scale.levels(images, labels)
    for c in range(2):
        thick = levels[labels == c, 0]
        assert (thick == -1).sum() == 3 and (thick == 1).sum() == 3 and (thick == 0).sum() == 3
    with pytest.raises(ValueError, match="at least 3 images of class 1"):
        AttributeScale.fit(images[:10], labels[:10], classes=2)


# ---- captions ---------------------------------------------------------------------------------------
def _levels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, 3), generator=g), torch.arange(n) % 10


def test_captions_are_deterministic_and_vary_with_variant():
    levels, labels = _levels(200)
    a = make_captions(labels, levels, seed=3)
    assert a.texts == make_captions(labels, levels, seed=3).texts
    assert torch.equal(a.requested, make_captions(labels, levels, seed=3).requested)
    assert sum(x != y for x, y in zip(a.texts, make_captions(labels, levels, seed=3, variant=1).texts,
                                      strict=True)) > 100


def test_captions_name_their_digit_and_exactly_the_requested_attributes():
    levels, labels = _levels(2000)
    caps = make_captions(labels, levels, seed=0)
    synonyms = {w: key for key, ws in ATTRIBUTE_WORDS.items() for w in ws}
    seen_words, seen_digits = set(), set()
    for text, label, req, row in zip(caps.texts, labels.tolist(), caps.requested.tolist(), levels.tolist(),
                                     strict=True):
        ws = words(text)
        assert DIGIT_WORDS[label] in ws or str(label) in ws, text
        seen_digits.add(label)
        named = {synonyms[w] for w in ws if w in synonyms}
        assert named == {(ATTRIBUTES[a], req[a]) for a in range(3) if req[a]}, (text, req)
        assert all(r == 0 or r == level for r, level in zip(req, row, strict=True))  # only true attributes
        seen_words.update(w for w in ws if w in synonyms)
    assert seen_digits == set(range(10))
    assert seen_words == set(synonyms)  # every synonym of every attribute at both levels
    # about 80 % of the extreme levels are named, the middle level never
    extreme = levels != 0
    share = float((caps.requested != 0)[extreme].double().mean())
    assert 0.75 < share < 0.85 and not bool((caps.requested != 0)[~extreme].any())


def test_held_out_templates_are_never_used_for_training_and_bring_unknown_words():
    levels, labels = _levels(500)
    train = set(make_captions(labels, levels).texts)
    held = make_captions(labels, levels, split="held_out").texts
    skeleton = {t.split("{")[0] for forms in HELD_OUT_TEMPLATES.values() for t in forms if not t.startswith("{")}
    assert not any(any(text.startswith(s) for s in skeleton) for text in train)
    assert not train & set(held)
    tok = Tokenizer(vocabulary())
    assert tok.encode(list(held)).unknown["photo"] > 0
    assert tok.encode(list(train)).unknown == {}
    with pytest.raises(ValueError, match="expected split 'train' or 'held_out'"):
        make_captions(labels, levels, split="test")


def test_caption_for_writes_a_requested_prompt():
    assert caption_for(7) == "a seven"
    assert caption_for(7, {"thickness": 1, "slant": -1}) == "a bold upright seven"
    assert caption_for(3, {"width": -1}, template=TRAIN_TEMPLATES["described"][2], numeral=True) \
        == "the digit 3, narrow"
    with pytest.raises(ValueError, match="levels -1 or 1"):
        caption_for(3, {"size": 1})


# ---- tokenizer and text encoder ---------------------------------------------------------------------
def test_tokenizer_bos_padding_unknown_words_and_length():
    tok = Tokenizer(("a", "bold", "seven", "7"), max_len=5)
    t = tok.encode(["A bold seven!", "", "purple 7 purple"])
    assert t.ids.tolist() == [[BOS, 3, 4, 5, PAD], [BOS, PAD, PAD, PAD, PAD], [BOS, UNK, 6, UNK, PAD]]
    assert t.mask.tolist()[1] == [True, False, False, False, False]
    assert t.unknown == {"purple": 2} and "2 word(s) outside the vocabulary" in t.describe_unknown()
    assert tok.decode(t.ids) == ["a bold seven", "", "<unk> 7 <unk>"]
    with pytest.raises(ValueError, match="caption 0 has 6 tokens with <bos>; the maximum is 5"):
        tok.encode("a a a a a")


def test_padding_does_not_change_the_text_encoder():
    torch.manual_seed(0)
    enc = TextEncoder(20, dim=32, depth=2, heads=4, max_len=12).double()
    ids = torch.tensor([[BOS, 5, 6, 7, PAD, PAD, PAD, PAD]])
    mask = ids != PAD
    tokens, pooled = enc(ids, mask)
    # other ids at the padded positions, and a longer padding
    junk = ids.clone()
    junk[0, 4:] = torch.tensor([9, 3, 11, 4])
    longer = torch.cat([junk, torch.full((1, 4), 13)], 1)
    for other in (junk, longer):
        t2, p2 = enc(other, torch.cat([mask, torch.zeros(1, other.shape[1] - 8, dtype=torch.bool)], 1))
        assert torch.allclose(t2[:, :4], tokens[:, :4], atol=1e-12) and torch.allclose(p2, pooled, atol=1e-12)
    with pytest.raises(ValueError, match="at least one real token"):
        enc(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"token ids in \[0, 20\)"):
        enc(torch.tensor([[BOS, 25]]), torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(masked_mean(tokens, mask), pooled)


def test_word_dropout_spares_bos_and_padding():
    ids = torch.tensor([[BOS, 5, 6, PAD]] * 2000)
    out = word_dropout(ids, 0.25, torch.Generator().manual_seed(0))
    assert (out[:, 0] == BOS).all() and (out[:, 3] == PAD).all()
    share = float((out[:, 1:3] == UNK).double().mean())
    assert abs(share - 0.25) < 0.02


def test_cross_attention_ignores_padded_context_and_starts_as_identity():
    torch.manual_seed(0)
    attn = CrossAttention(16, 8, heads=4).double()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    out = attn(x, ctx, torch.ones(2, 3, dtype=torch.bool))
    padded = torch.cat([ctx, 100 * torch.randn(2, 4, 8, dtype=torch.float64)], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)], 1)
    assert torch.allclose(attn(x, padded, mask), out, atol=1e-12)
    # a single context token: attention is that token's value, whatever the query
    one = attn(x, ctx[:, :1])
    assert torch.allclose(one, one[:, :1].expand_as(one), atol=1e-12)
    block = SpatialCrossAttention(16, 8).double()
    fmap = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert torch.equal(block(fmap, ctx, None), fmap)
    with pytest.raises(ValueError, match=r"expected a context of shape \(2, L, 8\)"):
        attn(x, torch.randn(2, 3, 7))


def test_unet_with_context_ignores_padding_and_checks_its_input():
    torch.manual_seed(0)
    unet = UNet(4, channels=(16, 32, 32), context_dim=8, patch=1).double()
    for p in unet.parameters():  # leave the zero initialisation, so the cross-attention matters
        p.data.add_(0.01 * torch.randn_like(p))
    z, t = torch.randn(2, 4, 7, 7, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    ctx = torch.randn(2, 3, 8, dtype=torch.float64)
    out = unet(z, t, context=ctx, context_mask=torch.ones(2, 3, dtype=torch.bool))
    padded = torch.cat([ctx, torch.randn(2, 2, 8, dtype=torch.float64)], 1)
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    assert torch.allclose(unet(z, t, context=padded, context_mask=mask), out, atol=1e-12)
    assert not torch.allclose(unet(z, t, context=ctx.flip(0), context_mask=mask[:, :3]), out, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected context of shape \(2, L, 8\)"):
        unet(z, t)
    with pytest.raises(ValueError, match="takes no context"):
        UNet(4, patch=1)(z.float(), t.float(), context=ctx.float())


# ---- CLIP's loss, zero-shot and retrieval ---------------------------------------------------------
def test_info_nce_on_a_hand_computed_two_by_two_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64) / torch.tensor([[1.0], [math.sqrt(2)]], dtype=torch.float64)
    c = 1 / math.sqrt(2)  # cosines: [[1, c], [0, c]]
    for s in (0.0, math.log(10.0)):
        k = math.exp(s)
        rows = -math.log(math.exp(k) / (math.exp(k) + math.exp(k * c))) - math.log(
            math.exp(k * c) / (1 + math.exp(k * c)))
        cols = -math.log(math.exp(k) / (math.exp(k) + 1)) + math.log(2)
        assert info_nce(img, txt, s).item() == pytest.approx((rows + cols) / 4, rel=1e-12)
    emb = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
           torch.tensor(0.5, dtype=torch.float64))
    assert torch.autograd.gradcheck(info_nce, tuple(e.requires_grad_() for e in emb))
    with pytest.raises(ValueError, match="same shape"):
        info_nce(img, txt[:1], 0.0)


def test_info_nce_is_small_for_matched_pairs_and_log_b_for_identical_embeddings():
    e = torch.eye(4, dtype=torch.float64)
    assert 0 <= info_nce(e, e, math.log(100)).item() < 1e-12  # log(1 + 3 e^-100) per row and column
    same = torch.ones(4, 2, dtype=torch.float64) / math.sqrt(2)
    assert info_nce(same, same, 1.0).item() == pytest.approx(math.log(4), rel=1e-12)


def _toy_clip():
    torch.manual_seed(0)
    return CLIP(10, embed_dim=8, text_dim=16, text_depth=1, heads=2, max_len=6, image_width=8)


def test_clip_shapes_normalisation_and_zero_shot_of_a_planted_model():
    clip = _toy_clip()
    images = torch.randn(6, 1, 28, 28)
    tokens = Tokens(torch.tensor([[BOS, 3, 4, PAD, PAD, PAD]] * 6), torch.tensor([[1, 1, 1, 0, 0, 0]] * 6).bool())
    assert clip.encode_image(images).shape == (6, 8) and clip.encode_text(tokens).shape == (6, 8)
    assert torch.allclose(clip.encode_image(images).norm(dim=1), torch.ones(6))
    loss = clip.loss(images, tokens)
    loss.backward()
    assert clip.logit_scale.grad is not None and math.isfinite(loss.item())
    # zero-shot against prompts equal to the images' own embedding directions
    emb = clip.encode_image(images).detach()

    class Planted(torch.nn.Module):
        def eval(self):
            return self

        def encode_image(self, x):
            return emb[: len(x)]

        def encode_text(self, t):
            return emb[t.ids[:, 1] - 3]

    prompts = [Tokens(torch.tensor([[BOS, 3 + k]]), torch.ones(1, 2, dtype=torch.bool)) for k in range(6)]
    assert zero_shot_predict(Planted(), images, prompts).tolist() == list(range(6))
    all_prompts = Tokens(torch.tensor([[BOS, 3 + k] for k in range(6)]), torch.ones(6, 2, dtype=torch.bool))
    assert retrieval_top1(Planted(), images, all_prompts) == 1.0
    assert torch.allclose(clip_score(Planted(), images, all_prompts), torch.ones(6))
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(Planted(), images, all_prompts[:3])


# ---- guidance with the empty caption, caption dropout ----------------------------------------------
def test_context_guidance_is_the_cfg_combination_with_the_empty_caption():
    torch.manual_seed(0)
    unet = UNet(4, channels=(16, 32, 32), context_dim=8, patch=1).double().eval()
    z, t = torch.randn(3, 4, 7, 7, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    ctx, mask = torch.randn(3, 5, 8, dtype=torch.float64), torch.ones(3, 5, dtype=torch.bool)
    null = {"context": torch.randn(1, 5, 8, dtype=torch.float64), "context_mask": mask[:1]}
    w = 2.5
    with torch.no_grad():
        want = (1 + w) * unet(z, t, context=ctx, context_mask=mask) - w * unet(
            z, t, context=null["context"].expand(3, 5, 8), context_mask=mask)
        got = context_guidance(unet, w, null)(z, t, context=ctx, context_mask=mask)
        assert torch.allclose(got, want, atol=1e-10)
        assert torch.equal(context_guidance(unet, 0.0, null)(z, t, context=ctx, context_mask=mask),
                           unet(z, t, context=ctx, context_mask=mask))
    with pytest.raises(ValueError, match="guidance weight w >= 0"):
        context_guidance(unet, -1.0, null)


def test_caption_dropout_and_the_empty_caption():
    e = empty_tokens(2, 5)
    assert e.ids.tolist() == [[BOS, PAD, PAD, PAD, PAD]] * 2 and e.mask.sum().item() == 2
    tok = Tokens(torch.tensor([[BOS, 4, 5]] * 4000), torch.ones(4000, 3, dtype=torch.bool))
    out = drop_captions(tok, 0.1, torch.Generator().manual_seed(0))
    dropped = (out.ids[:, 1] == PAD)
    assert abs(float(dropped.double().mean()) - 0.1) < 0.015
    assert (out.mask == (out.ids != PAD)).all() and (out.ids[~dropped] == tok.ids[~dropped]).all()


# ---- the unCLIP prior on a conditional Gaussian ----------------------------------------------------
def test_vector_flow_learns_a_conditional_gaussian():
    """x | c ~ N(A c, 0.3^2 I) in 2-D: the trained prior's samples for fixed conditions match the
    closed-form conditional mean and spread (fixed seeds; tolerances 0.1 and 25 %)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([[1.0, -0.5], [0.5, 1.0]])
    model = VectorDenoiser(2, 2, hidden=64, depth=2, emb_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    path = LinearPath()
    for _ in range(600):
        c = torch.randn(256, 2, generator=gen)
        x = c @ a.T + 0.3 * torch.randn(256, 2, generator=gen)
        loss = cfm_loss(model, x, path, generator=gen, cond=c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for cond in ([1.0, 0.0], [-1.0, 1.0]):
        c = torch.tensor([cond]).expand(2000, 2)
        x = sample_vectors(model, {"cond": c}, {"cond": c[:1]}, (2000, 2), w=0.0, nfe=30, generator=gen)
        assert torch.allclose(x.mean(0), torch.tensor(cond) @ a.T, atol=0.1), x.mean(0)
        assert torch.allclose(x.std(0), torch.full((2,), 0.3), rtol=0.25), x.std(0)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 2\) and cond of shape \(B, 2\)"):
        model(torch.zeros(3, 2), torch.zeros(3), cond=torch.zeros(3, 5))


def test_transformer_key_mask_must_be_boolean_of_the_batch_shape():
    tr = Transformer(8, 1, 2)
    with pytest.raises(ValueError, match=r"boolean mask of shape \(2, 3\)"):
        tr(torch.zeros(2, 3, 8), key_mask=torch.ones(2, 3))
