"""ARI and NMI against scikit-learn, one set at a time and batched with masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from settransformer.tasks.metrics import adjusted_rand_index, contingency_tables, normalized_mutual_info


def _random_labelling(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(0, 40))
    t = rng.integers(0, int(rng.integers(1, 6)), n)
    p = rng.integers(0, int(rng.integers(1, 6)), n) + int(rng.integers(-3, 3))
    kind = rng.random()
    if kind < 0.15:
        p = rng.permutation(5)[t] if n else p  # same partition, other names
    elif kind < 0.25:
        p = np.arange(n)  # every point its own cluster
    return t, p


@pytest.mark.parametrize("seed", range(3))
def test_single_sets_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(80):
        t, p = _random_labelling(rng)
        assert adjusted_rand_index(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
        assert normalized_mutual_info(t, p) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)


def test_batched_with_mask_matches_sklearn_per_set() -> None:
    rng = np.random.default_rng(7)
    b, n = 16, 50
    t = torch.as_tensor(rng.integers(0, 4, (b, n)))
    p = torch.as_tensor(rng.integers(0, 4, (b, n)))
    p[:4] = t[:4]  # some perfect sets
    p[4:8] = (t[4:8] + (torch.rand(4, n) < 0.1).long()) % 4  # some nearly perfect
    mask = torch.as_tensor(rng.random((b, n)) < 0.7)
    mask[-1] = False  # an empty set
    t_pad, p_pad = t.masked_fill(~mask, 99), p.masked_fill(~mask, -5)  # junk must not matter
    ari = adjusted_rand_index(t_pad, p_pad, mask)
    nmi = normalized_mutual_info(t_pad, p_pad, mask)
    assert ari.shape == nmi.shape == (b,) and ari.dtype == torch.float64
    for i in range(b):
        ti, pi = t[i][mask[i]].numpy(), p[i][mask[i]].numpy()
        assert ari[i].item() == pytest.approx(adjusted_rand_score(ti, pi), abs=1e-12)
        assert nmi[i].item() == pytest.approx(normalized_mutual_info_score(ti, pi), abs=1e-12)
    assert torch.allclose(ari[:4], torch.ones(4, dtype=torch.float64))
    assert torch.allclose(nmi[:4], torch.ones(4, dtype=torch.float64))


def test_numpy_batch_gives_numpy_and_scores_are_symmetric_and_name_free() -> None:
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 3, (4, 30)), rng.integers(0, 5, (4, 30))
    ari = adjusted_rand_index(t, p)
    assert isinstance(ari, np.ndarray) and ari.shape == (4,)
    np.testing.assert_allclose(ari, adjusted_rand_index(p, t))
    np.testing.assert_allclose(normalized_mutual_info(t, p), normalized_mutual_info(p, t))
    np.testing.assert_allclose(ari, adjusted_rand_index(t, (p + 3) * 7))


def test_contingency_counts() -> None:
    table = contingency_tables([0, 0, 1, 1, 1], [2, 3, 3, 3, 2])
    assert table.tolist() == [[[1.0, 1.0], [1.0, 2.0]]]


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="integer labels"):
        adjusted_rand_index(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shapes differ"):
        normalized_mutual_info([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="mask"):
        adjusted_rand_index(
            torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
        )


def test_r2_score_matches_scikit_learn_including_constant_targets() -> None:
    from sklearn.metrics import r2_score as sk_r2

    from settransformer.tasks.metrics import r2_score

    torch.manual_seed(0)
    target = torch.randn(20, 3, dtype=torch.float64)
    target[:, 1] = 4.0  # constant: predicted exactly below
    target[:, 2] = -1.0  # constant: predicted with an error below
    predicted = target + 0.3 * torch.randn(20, 3, dtype=torch.float64)
    predicted[:, 1] = 4.0
    got = r2_score(predicted, target)
    expected = sk_r2(target.numpy(), predicted.numpy(), multioutput="raw_values")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert got[1] == 1.0 and got[2] == 0.0
