"""Point-cloud classification data: a common container and loaders for the usual file formats.

Every loader returns a [`PointCloudData`][settransformer.data.pointclouds.PointCloudData] (train and test
[`PointSplit`][settransformer.data.pointclouds.PointSplit] plus class names), checked on the way in, so that a
bad file ends with a ``ValueError`` that names the file and the problem rather than with a shape error deep
inside training.

Formats (see ``shared/reference/paper.md``, "Data formats"):

- [`load_deepsets_h5`][settransformer.data.pointclouds.load_deepsets_h5]: the DeepSets / Set Transformer
  ``ModelNet40_cloud.h5``;
- [`load_pointnet_h5`][settransformer.data.pointclouds.load_pointnet_h5]: the PointNet release folder
  ``modelnet40_ply_hdf5_2048/``;
- [`settransformer.data.modelnet_off.load_modelnet_off`][settransformer.data.modelnet_off.load_modelnet_off]:
  the raw ModelNet40 tree of ``.off`` meshes;
- [`load_array`][settransformer.data.pointclouds.load_array]: any user ``.npy``/``.npz`` with points
  ``(S, N, D)`` and labels ``(S,)``.

Examples:
    >>> points = np.random.default_rng(0).normal(size=(50, 200, 3)).astype(np.float32)
    >>> np.savez("clouds.npz", points=points, labels=np.arange(50) % 5)  # 50 clouds of 5 classes
    >>> data = load_array("clouds.npz")  # a stratified 80/20 split
    >>> data.train.points.shape, data.test.points.shape, data.num_classes
    ((40, 200, 3), (10, 200, 3), 5)
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import hdf5
from .files import short
from .point_transforms import fixed_indices

__all__ = [
    "PointCloudData",
    "PointSplit",
    "check_split",
    "load_array",
    "load_deepsets_h5",
    "load_pointnet_h5",
    "split_stratified",
]


@dataclass
class PointSplit:
    """One split of a point-cloud classification data set (numpy, CPU).

    Attributes:
        points: ``(S, N, D)`` float32; rows where ``mask`` is False are zero padding.
        labels: ``(S,)`` int64 class indices.
        mask: ``(S, N)`` bool (True = real point), or ``None`` when every cloud has ``N`` points.
    """

    points: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])


@dataclass
class PointCloudData:
    """A train/test pair of [`PointSplit`][settransformer.data.pointclouds.PointSplit] with the class names
    (``num_classes = len(class_names)``)."""

    train: PointSplit
    test: PointSplit
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        """Feature size ``D`` of a point."""
        return int(self.train.points.shape[2])


def check_split(
    points: Any, labels: Any, mask: Any, where: str, num_classes: int | None = None
) -> PointSplit:
    """Validate raw arrays and return them as a [`PointSplit`][settransformer.data.pointclouds.PointSplit]
    (float32 / int64 / bool).

    Args:
        points: ``(S, N, D)`` numbers; labels: ``(S,)`` or ``(S, 1)`` integers; mask: ``(S, N)`` bool or None.
        where: what to name in error messages (file and key).
        num_classes: labels must lie in ``[0, num_classes)``; only non-negativity is checked when None.
    """
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 3 or min(points.shape) == 0 or not np.issubdtype(points.dtype, np.number):
        raise ValueError(
            f"{where}: expected numeric points of shape (S, N, D), got {points.dtype} {points.shape}"
        )
    if points.shape[2] < 2:
        raise ValueError(
            f"{where}: expected points of at least 2 coordinates (D >= 2), got D={points.shape[2]}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (points.shape[0],):
        raise ValueError(
            f"{where}: expected labels of shape ({points.shape[0]},) matching the {points.shape[0]} "
            f"clouds, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.number) or np.any(labels != np.round(labels)):
        raise ValueError(f"{where}: expected integer class labels, got {labels.dtype} values")
    labels = labels.astype(np.int64)
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        valid = "non-negative" if num_classes is None else f"in [0, {num_classes})"
        raise ValueError(f"{where}: label {int(labels[np.argmax(bad)])} is out of range (expected {valid})")
    points = points.astype(np.float32, copy=False)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != points.shape[:2]:
            raise ValueError(
                f"{where}: expected a bool mask of shape {points.shape[:2]}, got {mask.dtype} {mask.shape}"
            )
        if not mask.any(axis=1).all():
            raise ValueError(f"{where}: cloud {int(np.argmin(mask.any(axis=1)))} has no real point")
        points = np.where(mask[..., None], points, 0).astype(np.float32)
    if not np.isfinite(points).all():
        raise ValueError(f"{where}: points contain NaN or infinite values")
    return PointSplit(points, labels, mask)


def _check_classes(train: PointSplit, test: PointSplit, names: Sequence[str] | None, where: str) -> list[str]:
    """Class names for the data (``names`` or ``"0", "1", ...``), checking the test labels fit."""
    if train.points.shape[2] != test.points.shape[2]:
        raise ValueError(
            f"{where}: train points have D={train.points.shape[2]} but test points D={test.points.shape[2]}"
        )
    num = len(names) if names is not None else int(train.labels.max()) + 1
    clouds = len(train) + len(test)
    if names is None and num > clouds:
        # The model gets one output per class: a stray huge label would allocate a huge classifier.
        raise ValueError(
            f"{where}: the largest label is {num - 1} but there are only {clouds} clouds; "
            "number the classes 0..K-1"
        )
    for split, part in (("train", train), ("test", test)):
        if part.labels.max() >= num:
            raise ValueError(
                f"{where}: {split} label {int(part.labels.max())} is out of range [0, {num})"
                + (" (the number of class names)" if names is not None else " (the training labels)")
            )
    return list(names) if names is not None else [str(i) for i in range(num)]


def _read_h5(
    f: Any, path: Path, keys: Sequence[str], num_points: int | None = None
) -> tuple[str, np.ndarray]:
    """Read the first of ``keys`` present in ``f``; clouds are read in chunks, keeping ``num_points``
    evenly spaced points when given ([`fixed_indices`][settransformer.data.point_transforms.fixed_indices],
    the DeepSets every-k-th rule)."""
    key = next((k for k in keys if k in f), None)
    if key is None:
        raise ValueError(f"{path}: missing dataset {' or '.join(map(repr, keys))}; found {sorted(f.keys())}")
    ds = hdf5.dataset(f, path, key)
    if num_points is None or ds.ndim != 3 or ds.shape[1] <= num_points:
        return key, hdf5.read(f, path, key)
    idx = fixed_indices(ds.shape[1], num_points)
    chunk = max(1, 2**24 // max(1, ds.shape[1] * ds.shape[2]))
    parts = [hdf5.read(f, path, key, slice(i, i + chunk))[:, idx] for i in range(0, ds.shape[0], chunk)]
    return key, np.concatenate(parts) if parts else np.zeros((0, num_points, ds.shape[2]), ds.dtype)


def load_deepsets_h5(path: str | Path, num_points: int | None = None) -> PointCloudData:
    """Load the DeepSets / Set Transformer ``ModelNet40_cloud.h5``.

    Keys: ``tr_cloud`` and ``test_cloud`` ``(S, 10000, 3)``; labels ``tr_labels``/``test_labels`` (the
    code) or ``tr_label``/``test_label`` (the DeepSets README). Class names are not stored: ``"0".."39"``.

    Args:
        path: the ``.h5`` file.
        num_points: keep only this many evenly spaced points per cloud while reading (every
            ``N/num_points``-th point, as the DeepSets code subsamples), which saves memory.
    """
    path = Path(path)
    with hdf5.open_file(path) as f:
        splits = []
        for cloud, labels in (
            ("tr_cloud", ("tr_labels", "tr_label")),
            ("test_cloud", ("test_labels", "test_label")),
        ):
            _, x = _read_h5(f, path, [cloud], num_points)
            key, y = _read_h5(f, path, labels)
            splits.append(check_split(x, y, None, f"{path} [{cloud!r}/{key!r}]"))
    return PointCloudData(splits[0], splits[1], _check_classes(splits[0], splits[1], None, str(path)))


def _shard_list(folder: Path, split: str) -> list[Path]:
    """Shards of ``split`` from ``<split>_files.txt`` (entries resolved against ``folder``), else a glob."""
    listing = folder / f"{split}_files.txt"
    if not listing.is_file():
        shards = sorted(folder.glob(f"ply_data_{split}*.h5"))
        if not shards:
            raise ValueError(f"{folder}: neither {listing.name} nor ply_data_{split}*.h5 found")
        return shards
    shards = []
    for line in listing.read_text().splitlines():
        if line.strip():
            entry = Path(line.strip())
            # entries read "data/modelnet40_ply_hdf5_2048/ply_data_train0.h5", relative to the parent
            # of `data/`: the file itself is in `folder`
            candidates = [folder / entry, folder / entry.name]
            shards.append(next((c for c in candidates if c.is_file()), candidates[-1]))
    if not shards:
        raise ValueError(f"{listing}: lists no files")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"{listing}: listed file {missing[0].name} not found in {folder}")
    return shards


def load_pointnet_h5(
    folder: str | Path, num_points: int | None = None, with_normals: bool = False
) -> PointCloudData:
    """Load the PointNet ModelNet40 release (``modelnet40_ply_hdf5_2048/``).

    Shards ``ply_data_train*.h5`` / ``ply_data_test*.h5`` (listed in ``train_files.txt`` /
    ``test_files.txt`` when present), each with ``data`` ``(S, 2048, 3)`` float32 and ``label``
    ``(S, 1)`` uint8; class names from ``shape_names.txt`` when present.

    Args:
        folder: the release folder.
        num_points: keep this many evenly spaced points per cloud while reading.
        with_normals: append the shards' ``normal`` vectors to the points (``D = 6``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory (expected the modelnet40_ply_hdf5_2048 folder)")
    names_file = folder / "shape_names.txt"
    names = None
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    splits = []
    for split in ("train", "test"):
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for shard in _shard_list(folder, split):
            with hdf5.open_file(shard) as f:
                _, x = _read_h5(f, shard, ["data"], num_points)
                _, y = _read_h5(f, shard, ["label"])
                if with_normals:
                    _, n = _read_h5(f, shard, ["normal"], num_points)
                    if n.shape != x.shape:
                        raise ValueError(f"{shard}: 'normal' has shape {n.shape}, expected {x.shape}")
                    x = np.concatenate([x, n], axis=2)
            part = check_split(x, y, None, f"{shard} ['data'/'label']", None if names is None else len(names))
            if xs and part.points.shape[1:] != xs[0].shape[1:]:
                raise ValueError(
                    f"{shard}: clouds of shape {part.points.shape[1:]}, other shards {xs[0].shape[1:]}"
                )
            xs.append(part.points)
            ys.append(part.labels)
        splits.append(PointSplit(np.concatenate(xs), np.concatenate(ys)))
    return PointCloudData(splits[0], splits[1], _check_classes(splits[0], splits[1], names, str(folder)))


def split_stratified(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/test indices, ``test_fraction`` of every class (at least one) in the test part.

    Deterministic for a given ``seed``; ``labels: (S,)`` -> ``(train_idx, test_idx)`` sorted.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) > 1:
            test.append(idx[: max(1, round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read {what} as .npy (corrupt, or an object array?): {err}") from err


_ARRAY_KEYS = {
    f"{prefix}{name}" for prefix in ("", "train_", "test_") for name in ("points", "labels", "mask")
} | {"class_names"}


def load_array(
    path: str | Path,
    labels_path: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> PointCloudData:
    """Load user arrays: points ``(S, N, D)`` and labels ``(S,)`` (``allow_pickle=False``).

    ``.npz`` keys, either ``train_points``, ``train_labels``, ``test_points``, ``test_labels`` (optional
    ``train_mask``/``test_mask``) or ``points``, ``labels`` (optional ``mask``), split by
    [`split_stratified`][settransformer.data.pointclouds.split_stratified]; optional ``class_names``
    (strings). A ``.npy`` holds the points only, with labels from ``labels_path``.

    Args:
        path: the ``.npz`` or ``.npy`` file.
        labels_path: ``.npy`` labels for a ``.npy`` points file.
        test_fraction: the test share of single-split data.
        seed: the seed of that split.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix == ".npy":
        if labels_path is None:
            raise ValueError(f"{path}: a .npy file holds only the points; give labels_path, or use a .npz")
        arrays: dict[str, np.ndarray] = {"points": _load_npy(path, "points")}
        arrays["labels"] = _load_npy(Path(labels_path), "labels")
        found = sorted(arrays)
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                # Only the arrays this loader uses are decompressed (never unused, possibly huge ones).
                arrays = {k: z[k] for k in z.files if k in _ARRAY_KEYS}
                found = sorted(z.files)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(
                f"{path}: cannot read as .npz (corrupt, or object arrays?): {short(str(err), 120)}"
            ) from None
    else:
        raise ValueError(f"{path}: expected a .npz or .npy file")
    if "class_names" in arrays:  # bytes (np.savez of b"..." names, h5py strings) decoded, not "b'chair'"
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in arrays["class_names"]]
    else:
        names = None
    num = None if names is None else len(names)
    if {"train_points", "train_labels", "test_points", "test_labels"} <= arrays.keys():
        train, test = (
            check_split(
                arrays[f"{s}_points"], arrays[f"{s}_labels"], arrays.get(f"{s}_mask"), f"{path} [{s}]", num
            )
            for s in ("train", "test")
        )
    elif {"points", "labels"} <= arrays.keys():
        full = check_split(arrays["points"], arrays["labels"], arrays.get("mask"), str(path), num)
        tr, te = split_stratified(full.labels, test_fraction, seed)
        if len(te) == 0:
            raise ValueError(f"{path}: too few clouds per class to hold out a test split")
        pick = lambda i: PointSplit(  # noqa: E731
            full.points[i], full.labels[i], None if full.mask is None else full.mask[i]
        )
        train, test = pick(tr), pick(te)
    else:
        raise ValueError(
            f"{path}: expected keys train_points/train_labels/test_points/test_labels or points/labels, "
            f"found {short(found, 120)}"
        )
    return PointCloudData(train, test, _check_classes(train, test, names, str(path)))
