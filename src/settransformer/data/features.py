"""Loading a user's own feature vectors and class labels (for clustering experiments).

Accepted sources (all read without pickle):

- ``features.npz`` with arrays ``features`` ``(M, F)`` and ``labels`` ``(M,)``;
- ``features.h5`` / ``.hdf5`` with datasets of the same names (needs ``h5py``);
- a pair of ``.npy`` files: a tuple ``(features.npy, labels.npy)``, the string
  ``"features.npy,labels.npy"``, or a folder holding ``features.npy`` and ``labels.npy``.

Labels are non-negative integers (integral floats are accepted); features must be finite.

Examples:
    >>> np.savez("features.npz", features=np.random.rand(100, 16), labels=np.arange(100) % 4)
    >>> data = load_features("features.npz")
    >>> data.features.shape, data.features.dtype, data.labels.shape, data.labels.dtype
    ((100, 16), dtype('float32'), (100,), dtype('int64'))
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hdf5
from .files import short

__all__ = ["FeatureData", "load_features"]

PathLike = str | Path


@dataclass
class FeatureData:
    """Feature vectors with their class labels.

    Attributes:
        features: ``(M, F)`` float32.
        labels: ``(M,)`` int64, non-negative.
        source: where they were read from (for messages).
    """

    features: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return len(np.unique(self.labels))


_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
"""What reading a damaged ``.npy``/``.npz`` raises (truncated, not a zip, a bad CRC, bad compression)."""


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:  # object arrays need pickle, which is refused
        raise ValueError(
            f"{path}: not a .npy file readable without pickle ({short(str(err), 120)}); "
            "save plain numeric arrays"
        ) from None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: not a readable .npz archive ({short(str(err), 120)})") from None
    with archive:
        missing = [k for k in ("features", "labels") if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: missing array(s) {missing}; expected 'features' and 'labels', found {archive.files}"
            )
        try:
            return archive["features"], archive["labels"]
        except _READ_ERRORS as err:
            raise ValueError(
                f"{path}: cannot read without pickle, or damaged ({short(str(err), 120)}); "
                "save plain numeric arrays"
            ) from None


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with hdf5.open_file(path) as f:
        missing = [k for k in ("features", "labels") if k not in f]
        if missing:
            raise ValueError(
                f"{path}: missing dataset(s) {missing}; expected 'features' and 'labels', found {list(f)}"
            )
        return hdf5.read(f, path, "features"), hdf5.read(f, path, "labels")


def _resolve(source: PathLike | Sequence[PathLike]) -> tuple[str, tuple[Path, ...]]:
    if isinstance(source, str) and "," in source:
        source = [s.strip() for s in source.split(",")]
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return str(path), (path / "features.npy", path / "labels.npy")
        return str(path), (path,)
    paths = tuple(Path(p) for p in source)
    if len(paths) != 2:
        raise ValueError(
            f"features_path: expected a file, a folder or (features.npy, labels.npy), got {source!r}"
        )
    return f"{paths[0]}, {paths[1]}", paths


def _check(features: np.ndarray, labels: np.ndarray, name: str) -> FeatureData:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name}: features must have shape (M, F) with M, F >= 1, got {features.shape}")
    if not (np.issubdtype(features.dtype, np.number) or features.dtype == np.bool_):
        raise ValueError(f"{name}: features must be numeric, got dtype {features.dtype}")
    features = features.astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (M, 1), as some HDF5 releases store labels
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}: labels must have shape (M,) = ({features.shape[0]},) to match the features, "
            f"got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (
        np.isfinite(labels).all() and (labels == np.round(labels)).all()
    ):
        raise ValueError(f"{name}: labels must be integers, got non-integral values")
    if (labels < 0).any():
        raise ValueError(f"{name}: labels must be non-negative, got a minimum of {labels.min()}")
    return FeatureData(features, labels.astype(np.int64), name)


def load_features(source: PathLike | Sequence[PathLike]) -> FeatureData:
    """Read features ``(M, F)`` and labels ``(M,)`` from a ``.npz``, an ``.h5`` or two ``.npy`` files.

    Raises:
        ValueError: a named file does not exist or is damaged, unknown file type, missing keys,
            wrong shapes, non-finite features, or labels that are not non-negative integers; the
            message names the file.
    """
    name, paths = _resolve(source)
    for path in paths:
        if not path.is_file():
            raise ValueError(f"features_path: {path} does not exist")
    if len(paths) == 2:
        return _check(_npy(paths[0]), _npy(paths[1]), name)
    path = paths[0]
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _check(*_read_npz(path), name)
    if suffix in (".h5", ".hdf5"):
        return _check(*_read_h5(path), name)
    if suffix == ".npy":
        raise ValueError(
            f"{path}: a single .npy holds no labels; pass 'features.npy,labels.npy', a folder with both, "
            "or a .npz with arrays 'features' and 'labels'"
        )
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .npz, .h5/.hdf5 or two .npy files")
