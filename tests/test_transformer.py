"""course.transformer: adaLN-Zero blocks start as the identity, causal attention cannot see the
future (bit for bit) while bidirectional attention can, patches round-trip exactly."""

import pytest
import torch

from course.transformer import (
    Transformer,
    TransformerBlock,
    patchify,
    sinusoidal_positions,
    unpatchify,
)


def test_an_adaln_zero_block_is_the_identity_at_initialisation():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, cond_dim=16)
    x, cond = torch.randn(3, 7, 32), torch.randn(3, 16)
    assert torch.equal(block(x, cond), x)
    assert torch.equal(block(x, torch.randn(3, 7, 16)), x)  # one condition per token
    with torch.no_grad():  # any non-zero modulation makes it a real layer
        block.ada[1].bias.add_(0.1)
    assert not torch.allclose(block(x, cond), x)


def test_causal_attention_ignores_the_future_bit_for_bit_and_full_attention_does_not():
    torch.manual_seed(1)
    net = Transformer(32, depth=3, heads=4, cond_dim=8)
    for p in net.parameters():  # leave the zero initialisation so that attention matters
        p.data.normal_(0, 0.2)
    x, cond = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 4, 32)
    later_cond = cond.clone()
    later_cond[:, 6:] += 1.0
    a, b = net(x, cond, causal=True), net(later, later_cond, causal=True)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    full_a, full_b = net(x, cond), net(later, later_cond)
    assert (full_a[:, :6] - full_b[:, :6]).abs().max() > 1e-3


def test_patchify_is_raster_order_and_unpatchify_inverts_it_exactly():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(tokens[:, 1].reshape(2, 3, 4, 4), x[:, :, 0:4, 4:8])  # second patch of the top row
    assert torch.equal(tokens[:, 3].reshape(2, 3, 4, 4), x[:, :, 4:8, 0:4])  # first of the second row
    assert torch.equal(unpatchify(tokens, 4, (3, 8, 12)), x)
    assert torch.equal(unpatchify(patchify(x, 1), 1, (3, 8, 12)), x)


def test_sinusoidal_positions():
    pos = sinusoidal_positions(5, 8)
    assert pos.shape == (5, 8)
    assert torch.equal(pos[0, 0::2], torch.zeros(4)) and torch.equal(pos[0, 1::2], torch.ones(4))
    assert torch.allclose(pos[3, 0], torch.sin(torch.tensor(3.0)))


@pytest.mark.parametrize("call, message", [
    (lambda: TransformerBlock(30, 4), "divisible by heads"),
    (lambda: patchify(torch.zeros(1, 1, 7, 7), 2), "divisible by the patch size 2"),
    (lambda: unpatchify(torch.zeros(1, 5, 4), 2, (1, 4, 4)), r"expected tokens of shape \(B, 4, 4\)"),
    (lambda: Transformer(16, 1)(torch.zeros(2, 3, 8)), r"expected tokens of shape \(B, N, 16\)"),
    (lambda: Transformer(16, 1, cond_dim=4)(torch.zeros(2, 3, 16), torch.zeros(2, 5, 4)), "expected cond"),
    (lambda: Transformer(16, 1, cond_dim=4)(torch.zeros(2, 3, 16)), "expected cond"),
    (lambda: Transformer(16, 1)(torch.zeros(2, 3, 16), torch.zeros(2, 4)), "no conditioning"),
    (lambda: sinusoidal_positions(4, 5), "even dim"),
])
def test_bad_input_names_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
