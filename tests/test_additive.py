"""The additive score's two kernels (factored exponentials, and sigmoids as the fallback)."""

from __future__ import annotations

import pytest
import torch

from settransformer.nn import scores as additive
from settransformer.nn.scores import AdditiveScore, factored_range

F64 = torch.float64


def _bahdanau(score: AdditiveScore, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The textbook formula, holding every pre-activation."""
    pre = (
        torch.einsum("bhnd,hda->bhna", q, score.w_q)[:, :, :, None]
        + torch.einsum("bhnd,hda->bhna", k, score.w_k)[:, :, None]
        + score.bias[:, None, None]
    )
    return torch.einsum("bhqka,ha->bhqk", torch.tanh(pre), score.w)


@pytest.fixture(params=["factored", "sigmoids"])
def kernel(request, monkeypatch):
    """Run a test with each kernel: a span limit of 0 sends every call to the fallback."""
    if request.param == "sigmoids":
        monkeypatch.setattr(additive, "_SPAN_LIMIT", {torch.float32: 0.0, torch.float64: 0.0})
    calls: list[str] = []
    for name in ("_FactoredSigmoids", "_Sigmoids"):
        original = getattr(additive, name).apply  # bound to its class
        spy = lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args)  # noqa: E731
        monkeypatch.setattr(getattr(additive, name), "apply", spy)
    yield request.param
    expected = "_FactoredSigmoids" if request.param == "factored" else "_Sigmoids"
    assert calls and set(calls) == {expected}


# chunk_elements 1: one term per block; 18 = B H hidden * 3: blocks of 3 keys (7 keys: 3, 3, 1)
@pytest.mark.parametrize("chunk_elements", [1, 18, 2 * 3 * 3 * 7 * 2, 10**9])
def test_matches_bahdanau_formula(kernel, chunk_elements):
    torch.manual_seed(1)
    score = AdditiveScore(2, 4, hidden=3, chunk_elements=chunk_elements).double()
    q, k = torch.randn(3, 2, 5, 4, dtype=F64), torch.randn(3, 2, 7, 4, dtype=F64)
    torch.testing.assert_close(score(q, k), _bahdanau(score, q, k))


@pytest.mark.parametrize("chunk_elements", [4, 10**9])
def test_gradients_are_exact(kernel, chunk_elements):
    torch.manual_seed(2)
    score = AdditiveScore(2, 3, hidden=2, chunk_elements=chunk_elements).double()
    q = torch.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    k = torch.randn(2, 2, 4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, *p: score(q, k), (q, k, *score.parameters()))


def test_float32_kernels_agree_with_float64(kernel):
    torch.manual_seed(3)
    score = AdditiveScore(4, 8)
    q, k = torch.randn(2, 4, 50, 8, requires_grad=True), torch.randn(2, 4, 60, 8, requires_grad=True)
    out = score(q, k)
    (out * torch.linspace(-1, 1, 60)).sum().backward()
    ref = score.double()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    out64 = ref(q64, k64)
    (out64 * torch.linspace(-1, 1, 60, dtype=F64)).sum().backward()
    torch.testing.assert_close(out.double(), out64, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=1e-4, rtol=1e-4)


def test_wide_pre_activations_take_the_sigmoid_kernel_and_stay_exact(monkeypatch):
    torch.manual_seed(4)
    score = AdditiveScore(2, 4, hidden=3)
    q, k = 100 * torch.randn(1, 2, 6, 4), 100 * torch.randn(1, 2, 5, 4)
    _, span = factored_range(*_pre(score, q, k))
    assert span.max() > additive._SPAN_LIMIT[torch.float32]  # exp would overflow in float32
    monkeypatch.setattr(additive._FactoredSigmoids, "apply", None)  # calling it would fail
    out = score(q, k)
    assert torch.isfinite(out).all()
    ref = _bahdanau(score.double(), q.double(), k.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def _pre(score: AdditiveScore, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = 2 * (torch.einsum("bhnd,hda->bhna", q, score.w_q) + score.bias[:, None])
    return p, 2 * torch.einsum("bhnd,hda->bhan", k, score.w_k)


def test_factored_range_centres_every_exponent():
    p, r = torch.randn(2, 3, 5, 4) * 7, torch.randn(2, 3, 4, 6) * 3 + 2
    centre, span = factored_range(p, r)
    half = span[:, :, None, :] / 2 + 1e-6
    assert ((p - centre[:, :, None, :]).abs() <= half).all()
    assert ((-r - centre[..., None]).abs() <= span[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize(
    "shape", [((0, 2, 3, 4), (0, 2, 5, 4)), ((1, 2, 0, 4), (1, 2, 5, 4)), ((1, 2, 3, 4), (1, 2, 0, 4))]
)
def test_empty_inputs(shape):
    score = AdditiveScore(2, 4, hidden=3)
    q, k = torch.randn(shape[0]), torch.randn(shape[1])
    assert score(q, k).shape == (q.shape[0], 2, q.shape[2], k.shape[2])


def test_half_precision_uses_the_sigmoid_kernel():
    torch.manual_seed(5)
    score = AdditiveScore(2, 4, hidden=3).to(torch.bfloat16)
    q, k = torch.randn(1, 2, 6, 4, dtype=torch.bfloat16), torch.randn(1, 2, 5, 4, dtype=torch.bfloat16)
    out = score(q, k)
    assert out.dtype == torch.bfloat16
    ref = _bahdanau(score.double(), q.double(), k.double())
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.05)
