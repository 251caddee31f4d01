"""Loading user feature files: formats, and clear errors that name the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from settransformer.data.features import load_features


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(30, 5)).astype(np.float64), rng.integers(0, 4, 30)


def _check(data, arrays) -> None:
    x, y = arrays
    assert data.features.dtype == np.float32 and data.labels.dtype == np.int64
    np.testing.assert_allclose(data.features, x, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, y)
    assert data.num_classes == len(np.unique(y))


def test_npz(tmp_path: Path, arrays) -> None:
    np.savez(tmp_path / "f.npz", features=arrays[0], labels=arrays[1])
    _check(load_features(tmp_path / "f.npz"), arrays)


def test_h5_with_column_labels(tmp_path: Path, arrays) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = arrays[0]
        f["labels"] = arrays[1][:, None].astype(np.float32)  # (M, 1) floats, as some releases store them
    _check(load_features(str(tmp_path / "f.h5")), arrays)


def test_npy_pair_in_every_spelling(tmp_path: Path, arrays) -> None:
    np.save(tmp_path / "features.npy", arrays[0])
    np.save(tmp_path / "labels.npy", arrays[1])
    _check(load_features((tmp_path / "features.npy", tmp_path / "labels.npy")), arrays)
    _check(load_features(f"{tmp_path / 'features.npy'},{tmp_path / 'labels.npy'}"), arrays)
    _check(load_features(tmp_path), arrays)


def test_wrong_keys_name_the_file(tmp_path: Path, arrays) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, X=arrays[0], labels=arrays[1])
    with pytest.raises(ValueError, match=r"bad\.npz.*missing.*features"):
        load_features(path)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = arrays[0]
    with pytest.raises(ValueError, match=r"bad\.h5.*labels"):
        load_features(tmp_path / "bad.h5")


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros(10), np.zeros(10, int), "shape \\(M, F\\)"),
        (np.zeros((10, 2)), np.zeros(9, int), "labels must have shape"),
        (np.zeros((10, 2)), np.full(10, 0.5), "integers"),
        (np.zeros((10, 2)), -np.ones(10, int), "non-negative"),
        (np.full((10, 2), np.nan), np.zeros(10, int), "NaN"),
        (np.array([["a", "b"]] * 10), np.zeros(10, int), "numeric"),
    ],
)
def test_bad_arrays(tmp_path: Path, features, labels, message: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, features=features, labels=labels)
    with pytest.raises(ValueError, match=message) as err:
        load_features(path)
    assert "data.npz" in str(err.value)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, features=np.array([object()] * 4, dtype=object), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"obj\.npz.*pickle"):
        load_features(path)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothere"):
        load_features(tmp_path / "nothere.npz")
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_features(tmp_path / "f.csv")
    np.save(tmp_path / "only.npy", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no labels"):
        load_features(tmp_path / "only.npy")
