"""``settransformer.nn.attention``: scaled dot-product attention with masks and the empty-set rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from settransformer.nn.attention import attention, merge_heads, split_heads


def manual(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale) v with masked keys at -inf, in float64; empty sets give zero."""
    q, k, v = q.double(), k.double(), v.double()
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    weights = torch.softmax(scores, dim=-1)
    out = weights @ v
    if mask is not None:
        out = out.masked_fill(~mask.any(-1)[:, None, None, None], 0.0)
    return out


def qkv(b: int = 3, h: int = 2, nq: int = 4, nk: int = 6, dh: int = 8, dv: int = 8) -> tuple[Tensor, ...]:
    return torch.randn(b, h, nq, dh), torch.randn(b, h, nk, dh), torch.randn(b, h, nk, dv)


def test_default_scale_is_one_over_sqrt_head_dim() -> None:
    q, k, v = qkv(dh=16, dv=5)
    out = attention(q, k, v)
    assert out.shape == (3, 2, 4, 5)
    torch.testing.assert_close(out.double(), manual(q, k, v, None, 1 / math.sqrt(16)), atol=1e-5, rtol=1e-5)
    # and not the scale of the full width or no scale at all
    assert not torch.allclose(out.double(), manual(q, k, v, None, 1 / math.sqrt(32)), atol=1e-3)
    assert not torch.allclose(out.double(), manual(q, k, v, None, 1.0), atol=1e-3)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_scale_overrides_default(scale: float) -> None:
    q, k, v = qkv()
    out = attention(q, k, v, scale=scale)
    torch.testing.assert_close(out.double(), manual(q, k, v, None, scale), atol=1e-5, rtol=1e-5)


def test_query_batch_of_one_broadcasts() -> None:
    q, k, v = qkv(b=4)
    q1 = q[:1]
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    out = attention(q1, k, v, mask)
    assert out.shape == (4, 2, 4, 8)
    torch.testing.assert_close(out, attention(q1.expand(4, -1, -1, -1), k, v, mask))
    for b in range(4):
        torch.testing.assert_close(out[b : b + 1], attention(q1, k[b : b + 1], v[b : b + 1], mask[b : b + 1]))


def test_matches_manual_softmax_with_masks() -> None:
    q, k, v = qkv(b=4, nk=7)
    mask = torch.tensor(
        [
            [True] * 7,  # full
            [True, True, True, False, False, False, False],  # prefix
            [False, True, False, False, True, True, False],  # padding in the middle and in front
            [False] * 6 + [True],  # one element
        ]
    )
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), manual(q, k, v, mask, 1 / math.sqrt(8)), atol=1e-5, rtol=1e-5)
    # each row equals attention over its real keys alone
    for b in range(4):
        keep = mask[b]
        alone = attention(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep])
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-6, rtol=1e-5)


def test_masked_keys_have_no_influence_and_no_gradient() -> None:
    q, k, v = qkv(b=2)
    mask = torch.tensor([[True, False, True, False, True, True], [False, False, True, True, True, False]])
    k, v = k.requires_grad_(), v.requires_grad_()
    out = attention(q, k, v, mask)
    (out * torch.randn_like(out)).sum().backward()
    pad = ~mask[:, None, :, None].expand_as(k)
    assert k.grad is not None and v.grad is not None
    assert (k.grad[pad] == 0).all() and (v.grad[pad] == 0).all()
    assert (k.grad[~pad] != 0).any() and (v.grad[~pad] != 0).any()
    # changing masked keys/values changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[pad], v2[pad] = 1e4, -1e4
    torch.testing.assert_close(attention(q, k2, v2, mask), out.detach())


def test_empty_set_gives_exact_zero_and_finite_gradients() -> None:
    q, k, v = qkv(b=3)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # an empty set in the middle of the batch
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = attention(q, k, v, mask)
    assert (out[1] == 0).all()
    assert torch.isfinite(out).all()
    assert (out[0] != 0).any()
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()  # nothing flows back through the empty set


def test_all_sets_empty() -> None:
    q, k, v = qkv(b=2)
    out = attention(q, k, v, torch.zeros(2, 6, dtype=torch.bool))
    assert (out == 0).all()


def test_dropout_on_attention_weights() -> None:
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.0), attention(q, k, v))
    torch.manual_seed(1)
    dropped = attention(q, k, v, dropout_p=0.5)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, attention(q, k, v), atol=1e-4)


def test_split_and_merge_heads_round_trip() -> None:
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    # head j holds features j*4 .. j*4+3
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])
    torch.testing.assert_close(merge_heads(heads), x)
