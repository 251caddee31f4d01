"""Diagonal Gaussian mixtures: parameterisation, likelihood, EM step, assignments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from settransformer.data.mixtures import (
    MIN_SIGMA,
    MixtureParams,
    component_log_prob,
    em_step,
    hard_assignments,
    log_likelihood,
    mean_log_likelihood,
    mixture_nll,
    num_active_components,
    responsibilities,
)


def _random_params(b: int, k: int, d: int, dtype: torch.dtype = torch.float64) -> MixtureParams:
    return MixtureParams.from_output(torch.randn(b, k, 1 + 2 * d, dtype=dtype) * 2)


def _torch_reference(x: Tensor, params: MixtureParams) -> Tensor:
    """``(B, N)`` log-likelihoods from torch.distributions."""
    mix = MixtureSameFamily(
        Categorical(logits=params.log_pi), Independent(Normal(params.mu, params.sigma), 1)
    )
    return mix.log_prob(x.transpose(0, 1)).transpose(0, 1)  # batch shape (B,), samples (N, B, D)


def test_from_output_reads_weights_means_and_per_dimension_scales() -> None:
    out = torch.zeros(2, 3, 1 + 2 * 2)
    out[0, 1, 0] = 2.0  # logit of pi
    out[0, 1, 1:3] = torch.tensor([1.5, -0.5])  # mean
    out[0, 1, 3:5] = torch.tensor([-3.0, 4.0])  # raw scales of the two dimensions
    p = MixtureParams.from_output(out)
    assert torch.allclose(p.pi.sum(-1), torch.ones(2))
    assert p.pi[0, 1] > p.pi[0, 0]
    assert torch.equal(p.mu[0, 1], torch.tensor([1.5, -0.5]))
    expected = torch.nn.functional.softplus(torch.tensor([-3.0, 4.0])) + MIN_SIGMA
    assert torch.allclose(p.sigma[0, 1], expected)
    assert p.sigma[0, 1, 0] != p.sigma[0, 1, 1]  # one scale per dimension, not shared
    assert (p.sigma > 0).all()


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (2, 3, 1), (2, 3, 2)])
def test_from_output_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="1 \\+ 2D"):
        MixtureParams.from_output(torch.randn(*shape))


@pytest.mark.parametrize("d", [1, 2, 5])
def test_log_likelihood_matches_torch_distributions(d: int) -> None:
    params = _random_params(3, 4, d)
    x = torch.randn(3, 50, d, dtype=torch.float64) * 3
    assert torch.allclose(log_likelihood(x, params), _torch_reference(x, params), atol=1e-10)


def test_unused_components_with_minus_inf_weight_are_ignored() -> None:
    params = _random_params(2, 4, 2)
    x = torch.randn(2, 30, 2, dtype=torch.float64)
    log_pi = params.log_pi.clone()
    log_pi[:, 2:] = -math.inf
    log_pi[:, :2] = torch.log_softmax(log_pi[:, :2], -1)
    full = MixtureParams(log_pi, params.mu, params.sigma)
    first_two = MixtureParams(log_pi[:, :2], params.mu[:, :2], params.sigma[:, :2])
    assert torch.allclose(log_likelihood(x, full), log_likelihood(x, first_two))
    assert torch.isfinite(log_likelihood(x, full)).all()


def test_padding_is_ignored(padded) -> None:
    x, mask, sets = padded([7, 3, 10], 2, dtype=torch.float64)
    x[~mask] = float("nan")
    params = _random_params(3, 4, 2)
    ll = log_likelihood(x, params, mask)
    assert (ll[~mask] == 0).all()
    for b, s in enumerate(sets):
        one = MixtureParams(*(t[b : b + 1] for t in params))
        ref = _torch_reference(s[None], one)[0]
        assert torch.allclose(ll[b][mask[b]], ref)
        assert torch.allclose(mean_log_likelihood(x, params, mask)[b], ref.mean())
    assert torch.isfinite(responsibilities(x, params, mask)).all()


def test_nll_is_the_mean_over_real_points_and_trains() -> None:
    out = torch.randn(3, 4, 5, requires_grad=True)
    x = torch.randn(3, 6, 2)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2])
    loss = mixture_nll(out, x, mask)
    ll = log_likelihood(x, MixtureParams.from_output(out), mask)
    assert torch.allclose(loss, -ll[mask].mean())
    assert torch.allclose(mixture_nll(out, x), -log_likelihood(x, MixtureParams.from_output(out)).mean())
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def _em_reference(x: Tensor, params: MixtureParams) -> MixtureParams:
    """One EM step for a single set ``x: (N, D)`` written out point by point."""
    k = params.log_pi.shape[-1]
    r = torch.stack([torch.softmax(component_log_prob(xi[None, None], params)[0, 0], -1) for xi in x])
    n_k = r.sum(0)
    mu = torch.stack([(r[:, j, None] * x).sum(0) / n_k[j] for j in range(k)])
    var = torch.stack([(r[:, j, None] * (x - mu[j]) ** 2).sum(0) / n_k[j] for j in range(k)])
    return MixtureParams((n_k / len(x)).log()[None], mu[None], var.clamp_min(MIN_SIGMA**2).sqrt()[None])


def test_em_step_matches_the_textbook_update(padded) -> None:
    x, mask, sets = padded([40, 25], 3, dtype=torch.float64)
    params = _random_params(2, 3, 3)
    new = em_step(x, params, mask)
    for b, s in enumerate(sets):
        ref = _em_reference(s, MixtureParams(*(t[b : b + 1] for t in params)))
        for got, want in zip(new, ref):
            assert torch.allclose(got[b], want[0], atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_em_step_never_decreases_the_likelihood(seed: int, padded) -> None:
    torch.manual_seed(seed)
    x, mask, _ = padded([60, 13, 2, 35], 2, dtype=torch.float64)
    x = x + 4 * torch.randint(0, 2, x.shape, dtype=torch.float64)  # some cluster structure
    params = _random_params(4, 5, 2)
    ll = mean_log_likelihood(x, params, mask)
    for _ in range(5):
        params = em_step(x, params, mask)
        new = mean_log_likelihood(x, params, mask)
        assert (new >= ll - 1e-9).all(), (new - ll).min()
        assert torch.isfinite(new).all()
        ll = new


def test_em_step_keeps_an_empty_component() -> None:
    x = torch.randn(1, 20, 2, dtype=torch.float64)
    params = _random_params(1, 2, 2)
    far = MixtureParams(
        params.log_pi, torch.stack([params.mu[0, 0], torch.full((2,), 1e3)])[None], params.sigma
    )
    new = em_step(x, far, None)
    assert new.log_pi[0, 1] == -math.inf or new.log_pi[0, 1] < -100
    assert torch.equal(new.mu[0, 1], far.mu[0, 1])
    assert torch.isfinite(log_likelihood(x, new)).all()


def test_hard_assignments_are_the_argmax_responsibility(padded) -> None:
    x, mask, _ = padded([9, 4], 2)
    params = _random_params(2, 3, 2, torch.float32)
    labels = hard_assignments(x, params, mask)
    r = responsibilities(x, params, mask)
    assert torch.equal(labels[mask], r.argmax(-1)[mask])
    assert (labels[~mask] == -1).all()


def test_num_active_components() -> None:
    pi = torch.tensor([[0.5, 0.49, 0.01, 0.0], [0.25, 0.25, 0.25, 0.25]])
    params = MixtureParams(pi.log(), torch.zeros(2, 4, 1), torch.ones(2, 4, 1))
    assert num_active_components(params, 0.02).tolist() == [2, 4]
    assert num_active_components(params, 0.005).tolist() == [3, 4]


def test_coinciding_components_count_once() -> None:
    # Set 0: two clusters, one split over two components (at 0 and 0.5, 1 sigma apart), one far.
    # Set 1: a chain 0 - 1.5 - 3 merges into one cluster; a weightless component does not count.
    mu = torch.tensor(
        [[[0.0, 0.0], [0.5, 0.0], [10.0, 10.0], [-10.0, 0.0]], [[0.0, 0], [1.5, 0], [3, 0], [50, 0]]]
    )
    pi = torch.tensor([[0.3, 0.3, 0.4, 0.0], [0.3, 0.3, 0.4, 0.0]])
    params = MixtureParams(pi.log(), mu, torch.ones(2, 4, 2))
    assert num_active_components(params, 0.01).tolist() == [3, 3]
    assert num_active_components(params, 0.01, separation=2.0).tolist() == [2, 1]
    assert num_active_components(params, 0.01, separation=1.0).tolist() == [2, 3]  # the chain is 1.5 apart


def test_shape_mismatch_is_a_clear_error() -> None:
    params = _random_params(2, 3, 2)
    with pytest.raises(ValueError, match=r"params\.mu"):
        log_likelihood(torch.randn(2, 5, 3, dtype=torch.float64), params)
    with pytest.raises(ValueError, match="mask"):
        log_likelihood(torch.randn(2, 5, 2, dtype=torch.float64), params, torch.ones(2, 4, dtype=torch.bool))
