"""The raw ModelNet40 tree of ``.off`` meshes, sampled to point clouds and cached.

Layout: ``<root>/<class>/train/*.off`` and ``<root>/<class>/test/*.off``. Each mesh is parsed with
``trimesh`` (which also reads the files whose header is glued to the counts line, ``OFF490 518 0``)
and sampled by area-weighted uniform surface sampling. Sampling 12k meshes takes minutes, so the
result is cached to ``modelnet_off_<hash>.npz`` (under
[`default_cache_dir`][settransformer.data.files.default_cache_dir] unless told otherwise: the data folder
stays as the user left it, and may be read-only) whose hash covers the tree's location, the sampling
settings and the list of files (paths, sizes and modification times): changing any makes a new cache.

Requires ``trimesh`` (the ``train`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write, default_cache_dir
from .pointclouds import PointCloudData, PointSplit, check_split

__all__ = ["find_off_files", "load_modelnet_off", "read_off", "sample_surface"]

_CACHE_VERSION = 2  # bump when the sampling code changes, to invalidate old caches


def _trimesh() -> Any:
    try:
        import trimesh
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "reading .off meshes needs trimesh: pip install trimesh (or settransformer[train])",
            name="trimesh",
        ) from err
    return trimesh


def find_off_files(root: str | Path) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """List ``{"train": [(file, label)...], "test": [...]}`` and the sorted class names under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected the ModelNet40 folder of class folders)")
    classes = sorted(d.name for d in root.iterdir() if (d / "train").is_dir() or (d / "test").is_dir())
    if not classes:
        raise ValueError(f"{root}: no <class>/train or <class>/test folders found")
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        for split, part in files.items():
            part += [(f, label) for f in sorted((root / name / split).glob("*.off"))]
    for split, part in files.items():
        if not part:
            raise ValueError(f"{root}: no {split} meshes (<class>/{split}/*.off) found")
    return files, classes


def read_off(path: str | Path) -> Any:
    """Parse one ``.off`` file into a ``trimesh.Trimesh`` (``ValueError`` naming the file if it is bad)."""
    trimesh = _trimesh()
    path = Path(path)
    try:
        data = path.read_bytes()
        mesh = trimesh.load(io.BytesIO(data), file_type="off", process=False, force="mesh")
    except Exception as err:  # trimesh raises NameError, IndexError, ValueError... on bad files
        raise ValueError(f"{path}: cannot parse as an OFF mesh: {type(err).__name__}: {err}") from err
    faces, vertices = getattr(mesh, "faces", None), getattr(mesh, "vertices", None)
    if faces is None or vertices is None or len(faces) == 0 or not np.isfinite(vertices).all():
        raise ValueError(f"{path}: OFF mesh has no faces or non-finite vertices")
    declared = _declared_counts(data)
    if declared is not None:
        lines = [ln for ln in data.decode("latin-1").splitlines() if ln.split("#")[0].strip()]
        header = 2 if lines[0].strip().upper() == "OFF" else 1  # "OFF" then the counts, or one line
        if len(lines) - header < declared[0] + declared[1]:
            raise ValueError(
                f"{path}: OFF mesh declares {declared[0]} vertices and {declared[1]} faces but holds "
                f"{len(lines) - header} lines after its header (a truncated file?)"
            )
    return mesh


def _declared_counts(data: bytes) -> tuple[int, int] | None:
    """The vertex and face counts of an OFF header (``OFF`` then ``V F E``, or glued: ``OFFV F E``)."""
    tokens = " ".join(ln.split("#")[0] for ln in data[:4096].decode("latin-1").splitlines()).split()
    if not tokens or not tokens[0].upper().startswith("OFF"):
        return None
    counts = ([tokens[0][3:]] if len(tokens[0]) > 3 else []) + tokens[1:3]
    try:
        return int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        return None


def sample_surface(mesh: Any, num_points: int, seed: int, where: str = "mesh") -> np.ndarray:
    """``num_points`` points ``(num_points, 3)`` uniform on the surface (area-weighted faces), in float64:
    centring them before a cast to float32 keeps the precision of meshes far from the origin."""
    trimesh = _trimesh()
    if not mesh.area > 0:
        raise ValueError(f"{where}: mesh has zero surface area")
    points, _ = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return np.asarray(points, dtype=np.float64)


def _normalize(points: np.ndarray) -> np.ndarray:
    """Centre ``(N, 3)`` on its centroid and scale into the unit ball (as the PointNet release is)."""
    points = points - points.mean(0)
    return points / max(float(np.linalg.norm(points, axis=1).max()), 1e-12)


def _file_seed(seed: int, rel: str) -> int:
    """A per-file seed independent of file order, so adding a class does not reshuffle the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:4], "little")


def _cache_path(
    root: Path, files: dict[str, list[tuple[Path, int]]], settings: dict[str, Any], cache_dir: Path | None
) -> Path:
    # size and modification time: a mesh edited in place (same size) is sampled again
    stats = [(f, f.stat()) for part in files.values() for f, _ in part]
    listing = [(str(f.relative_to(root)), st.st_size, st.st_mtime_ns) for f, st in stats]
    key = json.dumps(
        {"root": str(root.resolve()), "settings": settings, "files": listing, "version": _CACHE_VERSION},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache_dir if cache_dir is not None else default_cache_dir()) / f"modelnet_off_{digest}.npz"


def load_modelnet_off(
    root: str | Path,
    points_per_shape: int = 2048,
    seed: int = 0,
    normalize: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PointCloudData:
    """Sample every mesh of a ModelNet-style ``.off`` tree to ``points_per_shape`` points, with a cache.

    Args:
        root: the folder of class folders (``ModelNet40/``).
        points_per_shape: points sampled per mesh (subsample later with the task's ``num_points``).
        seed: sampling seed (each file gets its own seed derived from it and its path).
        normalize: centre each cloud and scale it into the unit ball.
        cache_dir: where the ``.npz`` cache goes (default:
            [`default_cache_dir`][settransformer.data.files.default_cache_dir]); if it cannot be
            written a warning is issued and the data is still returned.
        progress: show a tqdm bar while sampling.

    Returns:
        [`PointCloudData`][settransformer.data.pointclouds.PointCloudData] with ``(S, points_per_shape, 3)``
            clouds and the class folder names.
    """
    root = Path(root)
    files, classes = find_off_files(root)
    settings = {"points_per_shape": points_per_shape, "seed": seed, "normalize": normalize}
    cache = _cache_path(root, files, settings, None if cache_dir is None else Path(cache_dir))
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                splits = [
                    check_split(z[f"{s}_points"], z[f"{s}_labels"], None, str(cache))
                    for s in ("train", "test")
                ]
            return PointCloudData(splits[0], splits[1], classes)
        except (ValueError, OSError, KeyError, EOFError) as err:
            warnings.warn(f"{cache}: unreadable cache ({err}); sampling the meshes again", stacklevel=2)
    from tqdm.auto import tqdm

    total = sum(len(p) for p in files.values())
    arrays: dict[str, np.ndarray] = {}
    with tqdm(total=total, desc="sampling .off meshes", disable=not progress, unit="mesh") as bar:
        for split, part in files.items():
            points = np.empty((len(part), points_per_shape, 3), np.float32)
            for i, (f, _) in enumerate(part):
                rel = str(f.relative_to(root))
                cloud = sample_surface(read_off(f), points_per_shape, _file_seed(seed, rel), str(f))
                cloud = (_normalize(cloud) if normalize else cloud).astype(np.float32)
                if not np.isfinite(cloud).all():
                    raise ValueError(
                        f"{f}: its sampled points are not finite in float32 (coordinates beyond "
                        "float32's range of 3.4e38; scale the mesh, or sample with normalize on)"
                    )
                points[i] = cloud
                bar.update()
            arrays[f"{split}_points"] = points
            arrays[f"{split}_labels"] = np.array([lab for _, lab in part], np.int64)
    try:
        atomic_write(cache, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except OSError as err:
        warnings.warn(f"{cache}: cannot write the point cache ({err}); continuing without it", stacklevel=2)
    return PointCloudData(
        PointSplit(arrays["train_points"], arrays["train_labels"]),
        PointSplit(arrays["test_points"], arrays["test_labels"]),
        classes,
    )
