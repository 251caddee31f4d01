"""Reading HDF5 files with one-line errors: every HDF5 reader of the library opens files and follows
dataset names through [`open_file`][settransformer.data.hdf5.open_file] and
[`dataset`][settransformer.data.hdf5.dataset].

HDF5 names can be links: a soft link (``/x`` -> ``/y``) or an external link (``x`` -> ``other.h5:/data``).
A link may point nowhere (a missing file or object) or loop (``/x`` -> ``/y`` -> ``/x``); h5py then raises a
``KeyError``, ``RuntimeError`` or ``OSError`` whose text names neither the file nor the link. Here each
becomes a ``ValueError`` of one line naming the file and the link, which the CLI prints with exit code 2.

Examples:
    >>> import h5py, numpy as np
    >>> with h5py.File("links.h5", "w") as f:
    ...     f["x"] = np.arange(3)
    ...     f["y"] = h5py.SoftLink("/z")
    ...     f["z"] = h5py.SoftLink("/y")
    >>> with open_file("links.h5") as f:
    ...     read(f, "links.h5", "x")
    array([0, 1, 2])
    >>> with open_file("links.h5") as f:
    ...     read(f, "links.h5", "y")
    Traceback (most recent call last):
    ValueError: links.h5: 'y' is a soft link to '/z' that cannot be followed (it loops or points to nothing)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .files import short

__all__ = ["dataset", "open_file", "read"]


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is in the `train` extra
        raise ValueError("reading HDF5 needs h5py (pip install 'settransformer[train]')") from None
    return h5py


def open_file(path: str | Path) -> Any:
    """``h5py.File(path, "r")``; a missing, truncated or non-HDF5 file is a ``ValueError`` naming ``path``.

    Use it as a context manager (``with open_file(path) as f:``).
    """
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None


def _link(f: Any, key: str) -> str:
    """What the name ``key`` is, in words, for messages (``a soft link to '/y'``)."""
    h5py = _h5py()
    try:
        link = f.get(key, getlink=True)
    except (KeyError, RuntimeError, OSError, ValueError):
        return "a link"
    if isinstance(link, h5py.ExternalLink):
        return f"an external link to {short(link.filename, 80)}:{short(link.path, 80)}"
    if isinstance(link, h5py.SoftLink):
        return f"a soft link to {short(link.path, 80)}"
    return "a link"


def dataset(f: Any, path: str | Path, key: str) -> Any:
    """The dataset ``f[key]`` of the open file ``f`` (read from ``path``), following links.

    Raises ``ValueError`` naming ``path`` and ``key`` when ``key`` is missing, is a group, or is a
    link that points to a missing file or object or loops.
    """
    h5py = _h5py()
    if key not in f:
        raise ValueError(f"{path}: no dataset {key!r}; found {short(sorted(f.keys()), 120)}")
    try:
        obj = f[key]
    except (KeyError, RuntimeError, OSError, ValueError):
        raise ValueError(
            f"{path}: {key!r} is {_link(f, key)} that cannot be followed (it loops or points to nothing)"
        ) from None
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"{path}: {key!r} must be a dataset, not a {type(obj).__name__.lower()}")
    return obj


def read(f: Any, path: str | Path, key: str, index: Any = ()) -> np.ndarray:
    """``f[key][index]`` as a NumPy array (see [`dataset`][settransformer.data.hdf5.dataset]); a failing read
    names ``path`` and ``key``.

    ``index`` selects a part (``slice(0, 100)``); the default reads the whole dataset.
    """
    ds = dataset(f, path, key)
    try:
        return np.asarray(ds[index])
    except (OSError, RuntimeError, KeyError) as err:
        raise ValueError(
            f"{path}: cannot read {key!r} (truncated or corrupt, or missing external storage?): "
            f"{short(str(err), 120)}"
        ) from None
