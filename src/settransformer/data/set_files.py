"""Sets read from files for inference: ``.npy``, ``.npz``, ``.h5`` and ``.csv``.

Layouts (every array numeric; ``D`` = features per element):

- ``.npy``: one set ``(N, D)``, or a batch of equal-size sets ``(S, N, D)``. Memory-mapped, so
  float32 sets are only read when used. A padded batch with a mask goes in ``.npz`` / ``.h5``.
- ``.npz`` / ``.h5`` (``.hdf5``; needs ``h5py``), by array / dataset name:

  - ``x`` (or ``sets``): ``(N, D)`` or ``(S, N, D)``, with an optional bool ``mask`` ``(N,)`` /
    ``(S, N)`` (True = real element; real elements need not come first);
  - or the ragged form: ``values (total, D)`` with ``offsets (S+1,)``, set ``i`` being
    ``values[offsets[i]:offsets[i+1]]``;
  - optional ``ids (S,)``: integers or strings naming the sets.

- ``.csv``: one element per row, every column a number; a first row with a non-number is a
  header. Without ``set_column`` the file is one set; with it (a header name) rows are grouped
  into sets by that column's value, in order of first appearance, and the value is the set's id.

Set ids: those in the file (``ids``, the CSV set column); else a file holding one set is named by
its path and the sets of a batch by their index. [`read_inputs`][settransformer.data.set_files.read_inputs]
over several files prefixes ids from the file (``"FILE:ID"``) so that they stay unique.

CSV files are read as UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one).

Files are never unpickled (``np.load(allow_pickle=False)``). A bad file (not the format its suffix
names, an array of Python objects, unreadable, missing or ambiguous arrays, wrong rank, non-numeric
values, another feature size than ``dim_input``, NaN or inf) raises ``ValueError`` naming the file
and the problem; a missing file ``FileNotFoundError``.

Examples:
    >>> values = np.random.default_rng(0).normal(size=(599, 3)).astype("float32")
    >>> np.savez("clouds.npz", values=values, offsets=np.array([0, 512, 599]))
    >>> sets, ids = read_sets("clouds.npz", dim_input=3)   # ragged: values + offsets
    >>> [tuple(s.shape) for s in sets], ids
    ([(512, 3), (87, 3)], [0, 1])
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import hdf5
from .files import short

__all__ = ["SUFFIXES", "SetId", "read_csv_rows", "read_inputs", "read_queries", "read_set", "read_sets"]

SetId = int | str
SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".csv")


def read_sets(
    path: str | Path,
    *,
    dim_input: int | None = None,
    set_column: str | None = None,
    skip_columns: Sequence[str] = (),
) -> tuple[list[np.ndarray], list[SetId]]:
    """The sets in one file and their ids; see the module docstring for the layouts.

    Args:
        path: a ``.npy``, ``.npz``, ``.h5``/``.hdf5`` or ``.csv`` file.
        dim_input: the feature size ``D`` the sets must have (the model's), or ``None``.
        set_column: for ``.csv``: the header name of the column holding set ids (ignored otherwise).
        skip_columns: for ``.csv``: header names of columns that are not features (e.g. a target).

    Returns:
        ``(sets, ids)``: ``S`` float32 arrays ``(N_i, D)`` (``N_i`` may be 0) and ``S`` ids.
    """
    sets, ids, single = _read(Path(path), dim_input, set_column, tuple(skip_columns))
    if ids is None:
        ids = [str(path)] if single else list(range(len(sets)))
    return sets, ids


def read_set(path: str | Path, *, dim_input: int | None = None) -> np.ndarray:
    """The one set of a ``.npy`` file (as in a folder of sets, one per file): a float32 ``(N, D)`` array.

    Unlike [`read_sets`][settransformer.data.set_files.read_sets], a batch ``(S, N, D)`` is refused:
    a ``ValueError`` naming the file says that a set is a 2-D array.

    Examples:
        >>> np.save("bag.npy", np.ones((4, 3)))
        >>> read_set("bag.npy").shape
        (4, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    if path.suffix.lower() != ".npy":
        raise ValueError(f"{path}: expected a .npy file holding one set (N, D)")
    x = _numeric(path, "the set", _load_npy(path))
    if x.ndim != 2:
        hint = {1: "; one feature per element? reshape to (N, 1)", 3: "; several sets? save one per file"}
        raise ValueError(
            f"{path}: a set is a 2-D array (N, D), N elements of D features; got shape {x.shape}"
            + hint.get(x.ndim, "")
        )
    (s,) = _finish(path, [x], [path.stem], dim_input)
    return s


def read_inputs(
    paths: Sequence[str | Path], *, dim_input: int | None = None, set_column: str | None = None
) -> tuple[list[np.ndarray], list[SetId]]:
    """The sets of several files, in order: ``(sets, ids)`` as
    [`read_sets`][settransformer.data.set_files.read_sets].

    With more than one file, ids from a file holding several sets become ``"FILE:ID"``
    (``"FILE:i"`` by index); a file holding one set is named by its path.
    """
    if len(paths) == 0:
        raise ValueError("paths: expected at least one input file")
    if set_column is not None and not any(Path(p).suffix.lower() == ".csv" for p in paths):
        raise ValueError(f"set_column {set_column!r}: applies to .csv inputs, and none was given")
    all_sets: list[np.ndarray] = []
    all_ids: list[SetId] = []
    for p in paths:
        sets, ids, single = _read(Path(p), dim_input, set_column)
        if ids is None and single:
            ids = [str(p)]
        elif len(paths) > 1:
            ids = [f"{p}:{i}" for i in (ids if ids is not None else range(len(sets)))]
        elif ids is None:
            ids = list(range(len(sets)))
        all_sets += sets
        all_ids += ids
    return all_sets, all_ids


def _read(
    path: Path, dim_input: int | None, set_column: str | None, skip_columns: tuple[str, ...] = ()
) -> tuple[list[np.ndarray], list[SetId] | None, bool]:
    """``(sets, ids from the file or None, whether the file holds a single set)``."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; pass its files (e.g. {path}/*.npy), each a set or a batch")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown input format {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".csv":
        groups, ids, single = _read_csv(path, set_column, skip_columns)
        checked = _finish(path, groups, ids, dim_input)
        return checked, ids, single
    if suffix == ".npy":
        return _split(path, {"x": _load_npy(path)}, dim_input)
    return _split(path, _named_arrays(path, _KNOWN_ARRAYS), dim_input)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip (np.savez())
_WRITER = {
    ".npy": "no .npy header, as np.save writes",
    ".npz": "not a zip archive of arrays, as np.savez writes",
}


def _check_format(path: Path, suffix: str) -> None:
    """Refuse a ``.npy`` / ``.npz`` file whose first bytes are not its format's. Checked here because
    ``np.load`` takes any other file for a pickle, and its refusal ("contains pickled (object) data")
    misleads about garbage or a renamed file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    npy, npz = head.startswith(_NPY_MAGIC), head.startswith(_ZIP_MAGIC)
    if (suffix == ".npy" and npy) or (suffix == ".npz" and npz):
        return
    if not head:
        what = "the file is empty"
    elif npy:
        what = "it holds one array, as np.save writes: name it .npy"
    elif npz:
        what = "it is a zip archive, as np.savez writes: name it .npz"
    elif head.startswith(b"\x80"):  # the PROTO opcode that starts every pickle of protocol 2 or later
        what = "it looks like a pickle, and files are read without pickle"
    else:
        what = _WRITER[suffix]
    raise ValueError(f"{path}: not a valid {suffix} file ({what})")


def _load_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped, never unpickled."""
    _check_format(path, ".npy")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _array_error(path, None, ".npy", e) from None


def _array_error(path: Path, name: str | None, suffix: str, err: Exception) -> ValueError:
    """One line for an array that ``np.load`` could not read. An object array is named as such:
    numpy's text ("cannot be loaded when allow_pickle=False") reads as if the fix were to allow pickle."""
    text = str(err)
    where = f"{path}: {name}" if name is not None else str(path)
    if "pickle" in text or "object" in text.lower():
        return ValueError(
            f"{where}: holds Python objects (dtype object), and files are read without pickle; "
            "store numbers or strings"
        )
    what = f"not a valid {suffix} file" if name is None else "not a readable array (a damaged file?)"
    return ValueError(f"{where}: {what} ({short(text, 120, quote=False)})")


_KNOWN_ARRAYS = ("x", "sets", "mask", "values", "offsets", "ids")
_QUERY_ARRAYS = ("queries", "query_values", "query_offsets")


def _named_arrays(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The arrays ``names`` that an ``.npz`` / ``.h5`` file holds, and ``"_keys"``: the names it
    holds (the first 20, for messages). Only these are decompressed (never unused, possibly huge ones)."""
    if path.suffix.lower() != ".npz":
        with hdf5.open_file(path) as f:
            arrays: dict[str, Any] = {k: hdf5.read(f, path, k) for k in names if k in f}
            arrays["_keys"] = np.array(sorted(f.keys())[:20], dtype=str)
        return arrays
    _check_format(path, ".npz")
    # zipfile reports a truncated or damaged archive as BadZipFile or zlib.error, not as ValueError.
    broken = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
    # Opened here, not by np.load: np.load leaves its own handle open when the zip is damaged.
    with open(path, "rb") as f:
        try:
            archive = np.load(f, allow_pickle=False)
        except broken as e:
            raise _array_error(path, None, ".npz", e) from None
        with archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError(f"{path}: not a valid .npz file ({_WRITER['.npz']})")
            arrays = {}
            for k in archive.files:
                if k in names:
                    try:
                        arrays[k] = archive[k]
                    except broken as e:  # each array is read on its own: the message names it
                        raise _array_error(path, k, ".npz", e) from None
            arrays["_keys"] = np.array(sorted(archive.files)[:20], dtype=str)
    return arrays


def read_queries(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """The query points of every set in ``paths`` (``.npz`` / ``.h5``), in the order of
    [`read_inputs`][settransformer.data.set_files.read_inputs]: for models called as
    ``model(x, mask, queries)`` (e.g. kernel regression).

    Each file holds ``queries`` ``(S, Q, Dq)`` (or ``(Q, Dq)`` beside a single set), or the ragged
    form ``query_values (total, Dq)`` with ``query_offsets (S+1,)``, set ``i`` asking for
    ``query_values[query_offsets[i]:query_offsets[i+1]]``.

    Returns:
        One float32 array ``(Q_i, Dq)`` per set.

    Examples:
        >>> np.savez("fits.npz", x=np.zeros((2, 5, 2)), queries=np.ones((2, 3, 1)))
        >>> [tuple(q.shape) for q in read_queries(["fits.npz"])]
        [(3, 1), (3, 1)]
    """
    if len(paths) == 0:
        raise ValueError("paths: expected at least one input file")
    out: list[np.ndarray] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")
        if path.suffix.lower() not in (".npz", ".h5", ".hdf5"):
            raise ValueError(
                f"{path}: query points need an .npz or .h5 file holding 'queries' beside the sets"
            )
        arrays = _named_arrays(path, _QUERY_ARRAYS)
        found = ", ".join(str(k) for k in arrays.pop("_keys"))
        layout = "'queries' (S, Q, Dq), or 'query_values' and 'query_offsets'"
        if ("queries" in arrays) == ("query_values" in arrays or "query_offsets" in arrays):
            raise ValueError(f"{path}: the model takes query points; expected {layout}; found {found}")
        if "queries" in arrays:
            q = _numeric(path, "queries", arrays["queries"])
            if q.ndim not in (2, 3):
                raise ValueError(f"{path}: queries: expected (S, Q, Dq) or (Q, Dq), got shape {q.shape}")
            groups = list(q[None] if q.ndim == 2 else q)
        else:
            if len(arrays) < 2:
                raise ValueError(f"{path}: expected {layout}; found {found}")
            values = _numeric(path, "query_values", arrays["query_values"])
            if values.ndim != 2:
                raise ValueError(f"{path}: query_values: expected (total, Dq), got shape {values.shape}")
            offsets = _offsets(path, arrays["query_offsets"], values.shape[0], "query_offsets")
            groups = [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        out += _finish(path, groups, None, None, "queries of set")
    return out


def _split(
    path: Path, arrays: dict[str, Any], dim_input: int | None
) -> tuple[list[np.ndarray], list[SetId] | None, bool]:
    """Sets from named arrays: dense ``x``/``sets`` (+ ``mask``) or ragged ``values`` + ``offsets``."""
    found = [str(k) for k in arrays.pop("_keys", arrays.keys())]
    dense: list[str] = [k for k in ("x", "sets") if k in arrays]
    ragged: list[str] = [k for k in ("values", "offsets") if k in arrays]
    layout = "arrays 'x' (or 'sets') with an optional 'mask', or 'values' and 'offsets'"
    if len(dense) > 1 or (dense and ragged):
        raise ValueError(f"{path}: holds {' and '.join(dense + ragged)}; expected only {layout}")
    if not dense and len(ragged) < 2:
        raise ValueError(f"{path}: expected {layout}; found {', '.join(found) or 'no arrays'}")
    if ragged and "mask" in arrays:
        raise ValueError(f"{path}: 'mask' goes with 'x', not with 'values' and 'offsets'")
    if dense:
        x = _numeric(path, dense[0], arrays[dense[0]])
        if x.ndim not in (2, 3):
            raise ValueError(
                f"{path}: {dense[0]}: expected one set (N, D) or a batch (S, N, D), got shape {x.shape}"
                + (" (one feature per element? reshape to (N, 1))" if x.ndim == 1 else "")
            )
        mask = _mask(path, arrays.get("mask"), x.shape[:-1])
        single = x.ndim == 2
        batch = x[None] if single else x
        bmask = None if mask is None else (mask[None] if single else mask)
        groups = [batch[i] if bmask is None else batch[i][bmask[i]] for i in range(batch.shape[0])]
        feat, where = int(x.shape[-1]), str(dense[0])
    else:
        values = _numeric(path, "values", arrays["values"])
        if values.ndim != 2:
            raise ValueError(f"{path}: values: expected all elements (total, D), got shape {values.shape}")
        offsets = _offsets(path, arrays["offsets"], values.shape[0])
        groups = [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        single, feat, where = False, values.shape[1], "values"
    _check_dim(path, where, feat, dim_input)
    ids = _ids(path, arrays.get("ids"), len(groups))
    return _finish(path, groups, ids, None), ids, single and ids is None


def _numeric(path: Path, name: str, a: Any) -> np.ndarray:
    a = np.asarray(a) if not isinstance(a, np.ndarray) else a
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{path}: {name}: expected numbers (float or int), got dtype {a.dtype}")
    return a


def _mask(path: Path, mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:  # refused, not converted, as the models refuse it (nn.validation)
        raise ValueError(
            f"{path}: mask: expected a bool array, True for real elements, got dtype {mask.dtype} "
            "(if 1 marks real elements, store mask.astype(bool))"
        )
    if mask.shape != shape:
        raise ValueError(f"{path}: mask: expected shape {shape} to match x, got {mask.shape}")
    return mask


def _offsets(path: Path, offsets: Any, total: int, name: str = "offsets") -> np.ndarray:
    o = np.asarray(offsets)
    expected = f"integers (S+1,) from 0 to {total} (the number of values), non-decreasing"
    if not np.issubdtype(o.dtype, np.integer) or o.ndim != 1 or o.shape[0] < 2:
        raise ValueError(f"{path}: {name}: expected {expected}, got {o.dtype} of shape {o.shape}")
    # Compared pairwise, not through np.diff: the difference of unsigned integers wraps around.
    if o[0] != 0 or o[-1] != total or (o[1:] < o[:-1]).any():
        raise ValueError(f"{path}: {name}: expected {expected}, got {short(o.tolist())}")
    return o.astype(np.int64)


def _ids(path: Path, ids: Any, count: int) -> list[SetId] | None:
    if ids is None:
        return None
    a = np.asarray(ids)
    if a.shape != (count,):
        raise ValueError(f"{path}: ids: expected one id per set, shape ({count},), got {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        return [int(i) for i in a.tolist()]
    if a.dtype.kind == "S":
        return [bytes(i).decode() for i in a.tolist()]
    if a.dtype.kind == "U" or a.dtype == object:  # h5py returns variable-length strings as objects
        return [i.decode() if isinstance(i, bytes) else str(i) for i in a.tolist()]
    raise ValueError(f"{path}: ids: expected integers or strings, got dtype {a.dtype}")


def _check_dim(path: Path, where: str, feat: int, dim_input: int | None) -> None:
    if dim_input is not None and feat != dim_input:
        raise ValueError(
            f"{path}: {where}: the elements have {feat} features, but the model expects dim_input={dim_input}"
        )


def _finish(
    path: Path,
    groups: Sequence[Any],
    ids: Sequence[SetId] | None,
    dim_input: int | None,
    what: str = "set",
) -> list[np.ndarray]:
    """Float32 sets ``(N_i, D)``, each checked for its feature size and finiteness."""
    if len(groups) == 0:
        raise ValueError(f"{path}: holds no sets")
    out = []
    for i, g in enumerate(groups):
        name = f"{what} {ids[i]!r}" if ids is not None else f"{what} {i}"
        _check_dim(path, name, g.shape[1], dim_input)
        # float32 memmaps stay mapped (no copy); anything else is converted once here.
        s = np.asarray(g, dtype=np.float32)
        finite = np.isfinite(s)
        if not finite.all():
            row, col = (int(v[0]) for v in np.nonzero(~finite))
            raise ValueError(
                f"{path}: {name}: element {row}, feature {col} is {s[row, col]} (inputs must be finite)"
            )
        out.append(s)
    return out


def _read_csv(
    path: Path, set_column: str | None, skip_columns: tuple[str, ...] = ()
) -> tuple[list[np.ndarray], list[SetId] | None, bool]:
    """Rows as float64 sets, grouped by ``set_column``; ``(sets, ids or None, single)``."""
    rows = read_csv_rows(path)
    if not rows:
        raise ValueError(f"{path}: holds no rows")
    header: list[str] | None = None
    if not all(_is_number(c) for c in rows[0][1]):
        header = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: has a header but no data rows")
    width = len(header) if header is not None else len(rows[0][1])
    names = header or [str(i) for i in range(width)]
    key = None
    if set_column is not None:
        if header is None:
            raise ValueError(f"{path}: set column {set_column!r}: needs a header row naming the columns")
        if set_column not in header:
            raise ValueError(f"{path}: set column {set_column!r}: not in the header ({', '.join(header)})")
        key = header.index(set_column)
    missing = [c for c in skip_columns if header is None or c not in header]
    if missing:
        raise ValueError(f"{path}: column {missing[0]!r}: not in the header ({', '.join(header or [])})")
    skipped = {header.index(c) for c in skip_columns} if header is not None else set()
    features = [j for j in range(width) if j != key and j not in skipped]
    if not features:
        raise ValueError(f"{path}: no feature columns besides the set column {set_column!r}")
    groups: dict[str, list[list[float]]] = {}
    for n, row in rows:
        if len(row) != width:
            raise ValueError(f"{path}: line {n}: expected {width} fields like the first row, got {len(row)}")
        try:
            values = [float(row[j]) for j in features]
        except ValueError:
            j = next(j for j in features if not _is_number(row[j]))
            hint = "" if set_column else f" (if it holds set ids, use set_column / --set-column {names[j]})"
            raise ValueError(
                f"{path}: line {n}, column {names[j]}: {row[j]!r} is not a number{hint}"
            ) from None
        groups.setdefault(row[key].strip() if key is not None else "", []).append(values)
    sets = [np.asarray(g, dtype=np.float64) for g in groups.values()]
    return sets, (list(groups) if key is not None else None), key is None


def read_csv_rows(path: str | Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file with their line numbers (from 1): ``[(line, fields)]``.

    Read as UTF-8: ``utf-8-sig`` drops the byte-order mark that Excel's "CSV UTF-8" writes, which
    would otherwise stick to the first header name. Raises ``ValueError`` naming the file for
    another encoding or a malformed file.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not a UTF-8 CSV file ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
