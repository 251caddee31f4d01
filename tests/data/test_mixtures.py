"""The mixture-of-Gaussians generator and its cached benchmark."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from settransformer.data.mixtures import load_benchmark, sample_mog


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_parameter_ranges() -> None:
    s = sample_mog(6, 200, _gen(), dim=3, num_components=5, sigma=0.5, mean_range=2.0)
    assert s.x.shape == (6, 200, 3) and s.labels.shape == (6, 200) and s.mask is None
    assert s.params.mu.shape == s.params.sigma.shape == (6, 5, 3) and s.params.log_pi.shape == (6, 5)
    assert torch.allclose(s.params.pi.sum(1), torch.ones(6))
    assert (s.params.mu.abs() <= 2.0).all() and (s.params.sigma == 0.5).all()
    assert s.labels.min() >= 0 and s.labels.max() < 5 and (s.num_clusters == 5).all()


def test_points_follow_their_component() -> None:
    s = sample_mog(4, 2000, _gen(1), sigma=0.3)
    centres = torch.gather(s.params.mu, 1, s.labels[..., None].expand(-1, -1, 2))
    z = (s.x - centres) / 0.3
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    freq = torch.stack([torch.bincount(s.labels[b], minlength=4) for b in range(4)]).float() / 2000
    assert torch.allclose(freq, s.params.pi, atol=0.05)


def test_weights_are_flat_dirichlet() -> None:
    pi = sample_mog(4000, 1, _gen(2), num_components=4).params.pi
    # Dirichlet(1,1,1,1): each weight is Beta(1, 3), mean 1/4, variance 3/80.
    assert torch.allclose(pi.mean(0), torch.full((4,), 0.25), atol=0.01)
    assert torch.allclose(pi.var(0), torch.full((4,), 3 / 80), atol=0.004)


def test_varying_number_of_clusters() -> None:
    s = sample_mog(500, 50, _gen(3), num_components=5, vary_components=True)
    counts = torch.bincount(s.num_clusters, minlength=6)
    assert counts[0] == 0 and (counts[1:] > 60).all()  # about 100 each
    slot = torch.arange(5)[None]
    unused = slot >= s.num_clusters[:, None]
    assert (s.params.log_pi[unused] == -math.inf).all() and (s.params.log_pi[~unused] > -math.inf).all()
    assert (s.labels < s.num_clusters[:, None]).all()


def test_generator_is_the_only_randomness() -> None:
    a = sample_mog(3, 10, _gen(5))
    torch.manual_seed(123)
    b = sample_mog(3, 10, _gen(5))
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.x, sample_mog(3, 10, _gen(6)).x)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_components"):
        sample_mog(2, 10, _gen(), num_components=0)
    with pytest.raises(ValueError, match="min_size"):
        load_benchmark(None, min_size=50, max_size=10)


def test_benchmark_is_cached_padded_and_has_the_oracle(tmp_path: Path) -> None:
    kwargs = {"num_sets": 12, "min_size": 20, "max_size": 60, "seed": 3}
    data = load_benchmark(tmp_path, **kwargs)
    files = list(tmp_path.glob("mog-benchmark-*.pt"))
    assert len(files) == 1
    sizes, mask = data["sizes"], data["mask"]
    assert data["x"].shape == (12, 60, 2)
    assert torch.equal(mask.sum(1), sizes) and (sizes >= 20).all() and (sizes <= 60).all()
    assert len(set(sizes.tolist())) > 1  # different sizes
    assert (data["labels"][~mask] == -1).all() and (data["x"][~mask] == 0).all()
    # The oracle, directly: log sum_k pi_k prod_d N(x_d; mu_kd, sigma_kd), point by point.
    for i in range(3):
        pts = data["x"][i][mask[i]].double()
        pi, mu, sig = data["log_pi"][i].exp().double(), data["mu"][i].double(), data["sigma"][i].double()
        dens = torch.zeros(len(pts), dtype=torch.float64)
        for k in range(len(pi)):
            g = torch.exp(-0.5 * ((pts - mu[k]) / sig[k]) ** 2) / (sig[k] * math.sqrt(2 * math.pi))
            dens += pi[k] * g.prod(1)
        assert data["oracle_ll"][i].item() == pytest.approx(dens.log().mean().item(), rel=1e-5)
    again = load_benchmark(tmp_path, **kwargs)  # read back from the file
    assert all(torch.equal(data[k], again[k]) for k in data)
    load_benchmark(tmp_path, **{**kwargs, "seed": 4})
    assert len(list(tmp_path.glob("mog-benchmark-*.pt"))) == 2


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_benchmark(blocker / "cache", num_sets=2, min_size=5, max_size=8)
    assert data["x"].shape[0] == 2
    assert any("could not cache" in str(w.message) for w in caught)
