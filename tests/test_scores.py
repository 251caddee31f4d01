"""Attention scores (dot, additive, Gaussian, custom) and hard top-k attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from settransformer import MAB, PMA, SAB, SetTransformer
from settransformer.nn.attention import attention
from settransformer.nn.scores import (
    CPU_VECTOR_BYTES,
    SHORT_ROW,
    SHORT_ROW_MIN_ELEMENTS,
    AdditiveScore,
    GaussianScore,
    attention_weights,
    make_score,
    masked_softmax,
    softmax,
    softmax_in_passes,
    top_k_mask,
)

F64 = torch.float64


class NegL1(nn.Module):
    """A custom score with a parameter: ``-a_h ||q - k||_1``."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return -(q[..., :, None, :] - k[..., None, :, :]).abs().sum(-1) * self.a.view(1, -1, 1, 1)


def _scores(heads: int = 2, dh: int = 4) -> dict[str, object]:
    return {
        "dot": None,
        "gaussian": GaussianScore(heads, bandwidth=[0.8, 1.7]).double(),
        "additive": AdditiveScore(heads, dh, hidden=3, chunk_elements=5).double(),
        "module": NegL1(heads).double(),
        "callable": lambda q, k: torch.cos(q @ k.transpose(-1, -2)),
    }


def _qkv(b: int = 3, h: int = 2, nq: int = 4, nk: int = 6, dh: int = 4):
    q, k, v = (torch.randn(b, h, n, dh, dtype=F64, requires_grad=True) for n in (nq, nk, nk))
    mask = torch.rand(b, nk) > 0.4
    mask[0] = True
    mask[1] = False  # an empty set
    mask[2, 0] = True
    return q, k, v, mask


def test_gaussian_logits_are_scaled_squared_distances():
    score = GaussianScore(2, bandwidth=[0.5, 2.0]).double()
    q, k = torch.randn(3, 2, 4, 5, dtype=F64), torch.randn(3, 2, 6, 5, dtype=F64)
    dist2 = (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)
    expected = -dist2 / (2 * torch.tensor([0.5, 2.0], dtype=F64).view(1, 2, 1, 1) ** 2)
    torch.testing.assert_close(score(q, k), expected)


def test_gaussian_fused_path_matches_explicit_softmax_with_gradients():
    score = GaussianScore(2, bandwidth=[0.8, 1.7]).double()
    q, k, v, mask = _qkv()
    fused = attention(q, k, v, mask, score=score)
    explicit = attention_weights(q, k, mask, score=lambda a, b: score(a, b)) @ v
    torch.testing.assert_close(fused, explicit)
    g1 = torch.autograd.grad(fused.sin().sum(), [q, k, v, score.log_bandwidth])
    g2 = torch.autograd.grad(explicit.sin().sum(), [q, k, v, score.log_bandwidth])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_gaussian_fixed_bandwidth_is_a_buffer():
    score = GaussianScore(4, bandwidth=2.0, learnable=False)
    assert list(score.parameters()) == [] and "log_bandwidth" in score.state_dict()
    torch.testing.assert_close(score.bandwidth, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianScore(2, bandwidth=-1.0)


@pytest.mark.parametrize("name", ["dot", "gaussian", "additive", "module", "callable"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_masks_and_empty_sets(name, top_k):
    score = _scores()[name]
    q, k, v, mask = _qkv()
    out = attention(q, k, v, mask, score=score, top_k=top_k)  # type: ignore[arg-type]
    assert out[1].abs().max() == 0  # the empty set: exactly zero
    with torch.inference_mode():  # built-in scores: the weights written over the logits
        torch.testing.assert_close(attention(q, k, v, mask, score=score, top_k=top_k), out.detach())  # type: ignore[arg-type]
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert k.grad[1].abs().max() == 0 and v.grad.transpose(1, 2)[~mask].abs().max() == 0
    # padded keys have no influence, whatever their values
    k2 = k.detach().masked_fill(~mask[:, None, :, None], 123.0)
    v2 = v.detach().masked_fill(~mask[:, None, :, None], -7.0)
    torch.testing.assert_close(attention(q, k2, v2, mask, score=score, top_k=top_k), out)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["dot", "gaussian", "additive", "module"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_blocks_stay_equivariant_and_invariant(name, top_k, padded, permute, gather):
    torch.manual_seed(2)
    score = "gaussian" if name == "gaussian" else "additive" if name == "additive" else None
    score = NegL1(2) if name == "module" else score
    sab = SAB(3, 8, 2, score=score, top_k=top_k).double()
    pma = PMA(8, 2, 2, score="gaussian" if name == "gaussian" else score, top_k=top_k).double()
    x, mask, _ = padded([5, 7, 2], 3, dtype=F64)
    xp, mp, perm = permute(x, mask)
    y, yp = sab(x, mask), sab(xp, mp)
    torch.testing.assert_close(yp, gather(y, perm))
    torch.testing.assert_close(pma(yp, mp), pma(y, mask))


def test_block_options_own_and_train_the_score():
    mab = MAB(4, 4, 8, 2, score="additive")
    assert isinstance(mab.score, AdditiveScore) and any(k.startswith("score.") for k in mab.state_dict())
    mab(torch.randn(2, 3, 4), torch.randn(2, 5, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mab.score.parameters())
    g = MAB(4, 4, 8, 2, score="gaussian")
    torch.testing.assert_close(g.score.bandwidth, torch.full((2,), 4**0.25))  # Dh ** 0.25
    custom = NegL1(2)
    assert MAB(4, 4, 8, 2, score=custom).score is custom
    assert MAB(4, 4, 8, 2).score is None and MAB(4, 4, 8, 2, score="dot").score is None
    assert "score.a" in MAB(4, 4, 8, 2, score=custom).state_dict()


def test_non_dot_scores_and_top_k_use_the_standard_path():
    assert MAB(128, 128, 128, 4).choose_form(4, 10_000) == "pooled"
    assert MAB(128, 128, 128, 4, score="gaussian").choose_form(4, 10_000) == "standard"
    assert MAB(128, 128, 128, 4, score="additive").choose_form(10_000, 32) == "standard"
    assert MAB(128, 128, 128, 4, top_k=3).choose_form(10_000, 32) == "standard"


def test_bad_options():
    with pytest.raises(ValueError, match="score"):
        MAB(4, 4, 8, 2, score="cosine")
    with pytest.raises(TypeError, match="score"):
        MAB(4, 4, 8, 2, score=3)  # type: ignore[arg-type]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            MAB(4, 4, 8, 2, top_k=bad)  # type: ignore[arg-type]
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="shape"):
        attention(q, k, k, score=lambda a, b: a @ a.transpose(-1, -2))


def test_top_k_zeroes_the_rest_and_renormalises():
    q, k, _, mask = _qkv(nk=9)
    w = attention_weights(q, k, mask, top_k=3)
    logits = (q @ k.transpose(-1, -2)) / 2
    real = mask.sum(-1).clamp(max=3)[:, None, None].expand(w.shape[:-1])
    torch.testing.assert_close((w > 0).sum(-1), real)
    for b in (0, 2):
        chosen = w[b] > 0
        # the kept keys are the highest-scoring real ones, renormalised
        best = logits[b].masked_fill(~mask[b], -torch.inf).topk(int(real[b, 0, 0]), dim=-1).indices
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter(-1, best, True))
        expected = torch.softmax(logits[b].masked_fill(~chosen, -torch.inf), -1)
        torch.testing.assert_close(w[b], expected)
    assert w[1].abs().max() == 0


def test_top_k_at_least_n_is_soft_attention():
    q, k, v, mask = _qkv()
    for score in (None, GaussianScore(2).double()):
        soft = attention(q, k, v, mask, score=score)
        for top_k in (6, 50):
            torch.testing.assert_close(attention(q, k, v, mask, score=score, top_k=top_k), soft)
    # a set with no more real keys than top_k also gets its soft weights
    n2 = int(mask[2].sum())
    assert n2 < 6
    torch.testing.assert_close(attention_weights(q, k, mask, top_k=n2)[2], attention_weights(q, k, mask)[2])


def test_top_k_ties_go_to_the_lower_index_and_skip_masked_keys():
    logits = torch.tensor([[[[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]]]])
    assert top_k_mask(logits, 2)[0, 0, 0].tolist() == [False, True, True, False, False, False]
    keep = torch.tensor([True, False, True, True, True, True])
    assert top_k_mask(logits, 2, keep)[0, 0, 0].tolist() == [False, False, True, True, False, False]
    # masked keys are never chosen, even with the highest logits
    mask = torch.tensor([[False, True, True, False, True, True]])
    big = torch.tensor([[[[9.0, 1.0, 2.0, 9.0, 3.0, 0.0]]]])
    w = masked_softmax(big, mask, top_k=2)[0, 0, 0]
    assert w[[0, 1, 3, 5]].abs().max() == 0 and w[[2, 4]].min() > 0


def test_top_k_gradients_flow_only_through_kept_keys():
    q, k, v, mask = _qkv(nk=8)
    out = attention(q, k, v, mask, top_k=2)
    out.sum().backward()
    w = attention_weights(q, k, mask, top_k=2).detach()
    used = w.sum(2) > 0  # (B, H, Nk): keys some query kept
    assert v.grad[~used].abs().max() == 0 and k.grad[~used].abs().max() == 0
    assert v.grad[used].abs().min() > 0


def test_set_transformer_with_scores_and_top_k(padded, permute):
    torch.manual_seed(3)
    for score in ("gaussian", "additive"):
        model = SetTransformer(
            2, 2, 3, dim_hidden=8, num_heads=2, num_inducing=3, score=score, top_k=2
        ).double()
        assert model.config["score"] == score and model.config["top_k"] == 2
        x, mask, _ = padded([6, 0, 3], 2, dtype=F64)
        xp, mp, _ = permute(x, mask)
        out = model(x, mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(xp, mp), out)


def test_make_score_names():
    assert make_score("dot", 4, 8) is None and make_score(None, 4, 8) is None
    assert isinstance(make_score("gaussian", 4, 8), GaussianScore)
    assert isinstance(make_score("additive", 4, 8), AdditiveScore)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_masked_softmax_in_place_writes_over_the_logits(top_k, masked):
    torch.manual_seed(6)
    logits = torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5]) if masked else None
    expected = masked_softmax(logits, mask, top_k)
    work = logits.clone()
    out = masked_softmax(work, mask, top_k, inplace=True)
    assert out.data_ptr() == work.data_ptr()
    torch.testing.assert_close(out, expected)
    if masked:
        assert out[1].abs().max() == 0  # the empty set


def test_masked_softmax_in_place_is_ignored_under_autograd():
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    before = logits.detach().clone()
    out = masked_softmax(logits, inplace=True)
    assert out.data_ptr() != logits.data_ptr() and torch.equal(logits.detach(), before)
    out[..., 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_a_custom_score_output_is_never_overwritten():
    cached = torch.randn(1, 2, 3, 5, dtype=F64)
    before = cached.clone()
    q, k = torch.randn(1, 2, 3, 4, dtype=F64), torch.randn(1, 2, 5, 4, dtype=F64)
    with torch.no_grad():
        weights = attention_weights(q, k, score=lambda q, k: cached)
    assert torch.equal(cached, before)
    torch.testing.assert_close(weights, torch.softmax(before, -1))


def test_masked_softmax_in_place_with_no_keys():
    logits = torch.randn(2, 3, 4, 0)
    assert masked_softmax(logits, inplace=True).shape == (2, 3, 4, 0)
    assert masked_softmax(logits, torch.zeros(2, 0, dtype=torch.bool), inplace=True).shape == (2, 3, 4, 0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_short_row_softmax_in_passes_equals_torch_softmax(dtype):
    row = CPU_VECTOR_BYTES // dtype.itemsize - 1  # the longest row shorter than one vector
    x = torch.randn(SHORT_ROW_MIN_ELEMENTS // row + 1, row, dtype=dtype) * 30
    x[0] = -torch.inf  # but one entry: a row can hold -inf where it is masked
    x[0, 1] = 2.0
    with torch.no_grad():
        assert softmax_in_passes(x)
        out = torch.empty_like(x)
        got = softmax(x, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, torch.softmax(x, -1))
        torch.testing.assert_close(softmax(x), torch.softmax(x, -1))


def test_softmax_in_passes_rule():
    short = torch.zeros(SHORT_ROW_MIN_ELEMENTS // 2, 2)
    with torch.no_grad():
        assert softmax_in_passes(short)
        assert not softmax_in_passes(torch.zeros(SHORT_ROW_MIN_ELEMENTS, SHORT_ROW))  # one whole vector
        assert not softmax_in_passes(torch.zeros(4, 2))  # too few values to pay for four launches
        assert not softmax_in_passes(short.half())
        assert not softmax_in_passes(torch.zeros(SHORT_ROW_MIN_ELEMENTS, 0))
    assert softmax_in_passes(short)  # no tensor needs a gradient
    assert not softmax_in_passes(short.requires_grad_())  # autograd: PyTorch's kernel and its backward


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_explicit_and_top_k_paths_keep_16_bit_scores_in_float32(dtype: torch.dtype) -> None:
    """Scores of 1e5 overflow float16 and lose bfloat16's few digits: the explicit kernel and the dot
    product's top-k path compute them in float32, as the fused kernel does (they gave NaN, or 50%
    errors, where the fused kernel was exact)."""
    g = torch.Generator().manual_seed(0)
    q, k = (
        (torch.randn(2, 4, 64, 8, generator=g) * 300).to(dtype),
        (torch.randn(2, 4, 64, 8, generator=g) * 300).to(dtype),
    )
    v = torch.randn(2, 4, 64, 8, generator=g).to(dtype)
    exact = attention(q.double(), k.double(), v.double())
    for kernel in ("explicit", "fused"):
        torch.testing.assert_close(attention(q, k, v, kernel=kernel).double(), exact, atol=1e-2, rtol=0)
    q3, k3 = q / 3, k / 3
    top = attention(q3.double(), k3.double(), v.double(), top_k=8)
    torch.testing.assert_close(attention(q3, k3, v, top_k=8).double(), top, atol=2e-2, rtol=0)


def test_gaussian_score_far_from_the_origin_keeps_its_digits() -> None:
    """``||q - k||^2`` expanded at an offset of 1e3 cancelled to 20% errors in float32; the score
    centres q and k first (it depends on q - k only)."""
    g = torch.Generator().manual_seed(1)
    q, k = 1000 + torch.randn(2, 2, 16, 8, generator=g), 1000 + torch.randn(2, 2, 64, 8, generator=g)
    v = torch.randn(2, 2, 64, 8, generator=g)
    score = GaussianScore(2, bandwidth=1.0, learnable=False)
    exact = attention(q.double(), k.double(), v.double(), score=score.double())
    torch.testing.assert_close(attention(q, k, v, score=score.float()).double(), exact, atol=1e-5, rtol=0)
    logits = score(q, k).double()
    torch.testing.assert_close(logits, score.double()(q.double(), k.double()), atol=1e-3, rtol=1e-5)
