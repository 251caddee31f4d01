"""Your own labelled sets: ``set-classification`` and ``set-regression`` on sets read from a file.

The sets are read with [`settransformer.data.set_files`][settransformer.data.set_files] (the layouts
``settransformer predict`` reads), plus one target per set:

- ``.npz`` / ``.h5``: ``x`` (+ ``mask``) or ragged ``values`` + ``offsets``, and ``y (S,)`` (the
  array named by the option ``target``; regression may give ``(S, K)``);
- a folder of ``.npy`` files, one set ``(N_i, D)`` each, with ``labels.csv`` beside them: a header
  naming a ``set`` column (the file name, with or without ``.npy``) and the ``target`` column;
- ``.csv``: one element per row, a ``set`` column of set ids (option ``set_column``) and a ``target``
  column holding the set's target on each of its rows; every other column is a feature.

Every set needs its target (an empty label or a NaN is an error, not a class), every row of
``labels.csv`` its ``.npy`` file, and the sets of a folder one feature size ``D``. A mistake in the
file is a ``ValueError`` of one line naming the file and the set or CSV line.

The sets are split into train, validation and test (seeded; stratified by class for
classification). Every feature is standardised with the mean and std of the training sets'
elements (regression targets too), and the model carries that preprocessing
([`Standardized`][settransformer.tasks.labelled_sets.Standardized]): the module that ``load_run``, ``predict``
and ``export`` use takes raw sets and returns logits or targets in the file's units. Class labels of any type
(ints, strings) are mapped to ids in sorted order and kept in the task options (``classes``), hence in every
checkpoint.

Models (``--model``): ``settransformer`` (``encoder=isab|sab|rff``, ``num_inducing``,
``pooling=pma|mean|sum|max``, ``dim_hidden``, ``num_heads``, ``num_layers``) or ``deepsets``
(``pooling=mean|sum|max``).

Examples:
    >>> sets = [np.random.rand(n, 3).astype(np.float32) for n in (5, 8, 6, 7, 9, 4, 5, 6, 8, 7)]
    >>> np.savez("bags.npz", values=np.concatenate(sets), offsets=np.cumsum([0] + [len(s) for s in sets]),
    ...          y=np.array(["a", "b"] * 5))
    >>> task = SetClassification(path="bags.npz", test_fraction=0.2, val_fraction=0.0)
    >>> task.options["classes"], task.dim_input
    (['a', 'b'], 3)
    >>> task.sample_batch(4, torch.Generator().manual_seed(0)).x.shape[0]
    4
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.set_files import SetId, _is_number, _named_arrays, read_csv_rows, read_set, read_sets
from ..nn.models import DeepSets, SetTransformer
from ..nn.sets import pad_sets
from ..nn.streaming import MappedRows
from ..nn.validation import zero_padding
from .base import Batch, Task
from .metrics import r2_score
from .report import save_figure

__all__ = [
    "LABELS_FILE",
    "LabelledSets",
    "SetClassification",
    "SetRegression",
    "Standardized",
    "read_labelled_sets",
    "split_indices",
]

LABELS_FILE = "labels.csv"
"""The labels of a folder of ``.npy`` sets."""
_EVAL_BATCH = 256


@dataclass
class LabelledSets:
    """Sets and their targets, as read from a file.

    Attributes:
        sets: ``S`` float32 arrays ``(N_i, D)``.
        targets: ``(S,)`` (labels of any type, or numbers) or ``(S, K)`` numbers.
        ids: ``S`` set ids (from the file, else indices).
    """

    sets: list[np.ndarray]
    targets: np.ndarray
    ids: list[SetId]


def read_labelled_sets(
    path: str | Path, *, target: str = "y", set_column: str = "set", numbers: bool = False
) -> LabelledSets:
    """The sets and targets of a ``.npz``/``.h5`` file, a ``.csv`` file or a folder of ``.npy`` sets.

    See the module docstring for the layouts. Every set needs a target: an empty label (an empty
    CSV cell or string) or a NaN is refused, not read as a class. ``numbers=True`` (regression)
    also refuses targets that are not numbers, or not finite.

    Raises ``ValueError`` of one line naming the file, and the set or CSV line where one is at
    fault: a missing file, an unknown layout, a missing target array or column, a target count that
    differs from the set count, a set or target missing, sets of another feature size than the
    others in a folder.

    Examples:
        >>> _ = Path("bags.csv").write_text("set,a,b,y\\ns1,1,2,cat\\ns1,3,4,cat\\ns2,5,6,dog\\n")
        >>> data = read_labelled_sets("bags.csv")
        >>> [s.shape for s in data.sets], data.targets.tolist(), data.ids
        ([(2, 2), (1, 2)], ['cat', 'dog'], ['s1', 's2'])
    """
    p = Path(path)
    if p.is_dir():
        data, where = _read_folder(p, target, set_column, numbers)
    elif not p.is_file():
        raise ValueError(f"path {p}: no such file or folder")
    elif p.suffix.lower() == ".csv":
        sets, ids = read_sets(p, set_column=set_column, skip_columns=(target,))
        by_set = _csv_column(p, set_column, target)
        lines = [by_set[str(i)][1] for i in ids]
        data = LabelledSets(sets, _as_targets([by_set[str(i)][0] for i in ids], numbers), ids)

        def where(i: int) -> str:
            return f"{p}: line {lines[i]}: set {ids[i]!r}"
    elif p.suffix.lower() in (".npz", ".h5", ".hdf5"):
        sets, ids = read_sets(p)
        y = _stored_array(p, target)
        if len(sets) == 1 and y.ndim > 0 and y.shape[0] > 1:
            # The likely mistake: x (S, N) of one feature per element, read as one set (N, D).
            raise ValueError(
                f"{p}: holds one set but {y.shape[0]} targets in {target}: S sets go in x (S, N, D) "
                "(a 2-D x is one set (N, D)) or ragged in values + offsets"
            )
        if y.shape[:1] != (len(sets),) or y.ndim > 2:
            raise ValueError(
                f"{p}: {target}: expected one target per set, ({len(sets)},), got shape {y.shape}"
            )
        data = LabelledSets(sets, y, ids)

        def where(i: int) -> str:
            return f"{p}: set {ids[i]!r}" + (f" ({target}[{i}])" if ids[i] != i else "")
    else:
        raise ValueError(f"{p}: expected a .npz, .h5, .csv file or a folder of .npy sets with {LABELS_FILE}")
    _check_targets(p, data.targets, target, numbers, where)
    return data


def _read_folder(
    folder: Path, target: str, set_column: str, numbers: bool
) -> tuple[LabelledSets, Callable[[int], str]]:
    """The sets of a folder of ``.npy`` files with their labels, and where each set's label is."""
    labels = folder / LABELS_FILE
    if not labels.is_file():
        raise ValueError(
            f"{folder}: a folder of .npy sets needs {LABELS_FILE} (columns {set_column}, {target})"
        )
    by_name = _csv_column(labels, set_column, target)
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise ValueError(f"{folder}: holds no .npy sets")
    # A label without its file is refused like a file without its label: dropping the set would
    # train on fewer sets than the user listed, without a word.
    names = {f.name for f in files} | {f.stem for f in files}
    for name, (_, line) in by_name.items():
        if name not in names:
            missing = name if name.lower().endswith(".npy") else f"{name}.npy"
            raise ValueError(f"{labels}: line {line}: no file {missing} in the folder for the set {name!r}")
    sets, cells = [], []
    for f in files:
        cell = by_name.get(f.name, by_name.get(f.stem))
        if cell is None:
            raise ValueError(f"{labels}: no {target} for the set {f.name}")
        other = by_name.get(f.stem)
        if other is not None and other[0] != cell[0]:  # listed both as "b1.npy" and as "b1"
            raise ValueError(
                f"{labels}: line {max(cell[1], other[1])}: set {f.name} has {target} "
                f"{(cell if cell[1] > other[1] else other)[0]!r}, but "
                f"{(other if cell[1] > other[1] else cell)[0]!r} on line {min(cell[1], other[1])}"
            )
        sets.append(read_set(f))
        cells.append(cell)
    dims = Counter(s.shape[1] for s in sets)
    if len(dims) > 1:  # the sets are batched together, so they need one feature size
        dim, count = dims.most_common(1)[0]
        f, s = next((f, s) for f, s in zip(files, sets) if s.shape[1] != dim)
        raise ValueError(
            f"{f}: a set of D={s.shape[1]} features per element, but {count} of the {len(sets)} sets "
            f"have D={dim}; every set needs the same D"
        )
    data = LabelledSets(sets, _as_targets([text for text, _ in cells], numbers), [f.stem for f in files])

    def where(i: int) -> str:
        return f"{labels}: line {cells[i][1]}: set {files[i].name}"

    return data, where


def _csv_column(path: Path, key: str, column: str) -> dict[str, tuple[str, int]]:
    """``{set id: (the column's value, its first line)}`` of a CSV with a header; the value must agree
    within a set, and neither may be empty."""
    rows = read_csv_rows(path)
    header = [c.strip() for c in rows[0][1]] if rows else []
    for name in (key, column):
        if name not in header:
            raise ValueError(f"{path}: column {name!r}: not in the header ({', '.join(header)})")
    k, c = header.index(key), header.index(column)
    out: dict[str, tuple[str, int]] = {}
    for n, row in rows[1:]:
        if len(row) <= max(k, c):
            raise ValueError(
                f"{path}: line {n}: expected {len(header)} fields like the header, got {len(row)}"
            )
        set_id, value = row[k].strip(), row[c].strip()
        if not set_id:
            raise ValueError(f"{path}: line {n}: no set named in column {key!r} (an empty cell)")
        if not value:  # an empty cell is a missing label, not a class named ''
            raise ValueError(f"{path}: line {n}: set {set_id!r} has no {column} (an empty cell)")
        first = out.setdefault(set_id, (value, n))[0]
        if first != value:
            raise ValueError(
                f"{path}: line {n}: set {set_id!r} has {column} {value!r}, but {first!r} on an earlier row"
            )
    return out


def _as_targets(values: Sequence[str], numbers: bool) -> np.ndarray:
    """CSV texts as targets: ints when all are integers, floats when all are numbers, else the
    texts. Class labels (not ``numbers``) are numbers only when each is written as Python writes
    its number (``7``, ``0.5``, ``nan``), so that ``"007"`` and ``"7"`` stay two classes."""
    if not numbers and not all(_canonical_number(v) for v in values):
        return np.array(values, dtype=str)
    for kind in (int, float):
        try:
            return np.array([kind(v) for v in values])
        except ValueError:
            continue
    return np.array(values, dtype=str)


def _canonical_number(text: str) -> bool:
    """Whether ``text`` is an int or float as ``str`` writes it (``7``, ``-0.5``, ``nan``)."""
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
        return True
    try:
        return repr(float(text)) == text
    except ValueError:
        return False


def _check_targets(
    path: Path, y: np.ndarray, target: str, numbers: bool, where: Callable[[int], str]
) -> None:
    """Refuse a set without a target: an empty label or NaN would otherwise become a class of its own
    (``''``, ``'nan'``). ``numbers``: targets to regress, which must be finite numbers.
    ``where(i)`` names the file and the place of set ``i``'s target, for the message."""
    rows = y.reshape(len(y), -1)
    if y.dtype.kind in "US":
        empty = np.flatnonzero((np.char.str_len(np.char.strip(rows)) == 0).any(1))
        if len(empty):
            raise ValueError(f"{where(int(empty[0]))}: no {target} (an empty label)")
        if numbers:
            for i, row in enumerate(rows.tolist()):
                bad = [v for v in row if not _is_number(v)]
                if bad:
                    raise ValueError(f"{where(i)}: {target} {bad[0]!r} is not a number to regress")
            raise ValueError(f"{path}: {target}: expected numbers to regress, got text (dtype {y.dtype})")
    elif y.dtype.kind == "f":
        for i in np.flatnonzero(~np.isfinite(rows).all(1)).tolist()[:1]:
            value = next(v for v in rows[i].tolist() if not np.isfinite(v))
            if np.isnan(value):
                raise ValueError(f"{where(i)}: no {target} (NaN)")
            raise ValueError(f"{where(i)}: {target} is {value}, not a finite number")
    elif numbers and y.dtype.kind not in "iu":
        raise ValueError(f"{path}: {target}: expected numbers to regress, got dtype {y.dtype}")


def _stored_array(path: Path, name: str) -> np.ndarray:
    """The array ``name`` of an ``.npz`` or ``.h5`` file, never unpickled; h5py's byte strings as text."""
    arrays = _named_arrays(path, (name,))
    found = ", ".join(str(k) for k in arrays.pop("_keys"))
    if name not in arrays:
        kind = "array" if path.suffix.lower() == ".npz" else "dataset"
        raise ValueError(f"{path}: no {kind} {name!r} of targets (found {found})")
    y = np.asarray(arrays[name])
    if y.dtype.kind in "SO":  # h5py strings come back as bytes
        y = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist()], dtype=str)
    return y


def split_indices(
    count: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ``(train, val, test)`` index arrays over ``count`` items.

    With ``strata: (count,)`` (class ids) each class is split in the given fractions on its own,
    so every split keeps the class proportions (up to rounding).

    Examples:
        >>> train, val, test = split_indices(10, 0.2, 0.2, seed=0)
        >>> len(train), len(val), len(test)
        (6, 2, 2)
    """
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(count)] if strata is None else [np.flatnonzero(strata == c) for c in np.unique(strata)]
    )
    parts: list[list[np.ndarray]] = [[], [], []]
    for g in groups:
        g = rng.permutation(g)
        n_test, n_val = round(len(g) * test_fraction), round(len(g) * val_fraction)
        parts[2].append(g[:n_test])
        parts[1].append(g[n_test : n_test + n_val])
        parts[0].append(g[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, val, test


class Standardized(nn.Module):
    """A set model with the preprocessing it was trained with, so it takes raw sets.

    ``forward(x, mask) = model((x - mean) / std, mask) * scale + shift``, flattened to ``(B, K)``
    (``(B,)`` when ``squeeze``); padded rows stay zero. ``mean, std: (D,)``, ``shift, scale: (K,)``
    are buffers, saved with the weights.

    Examples:
        >>> net = SetTransformer(2, 1, 3, dim_hidden=8, num_heads=2, num_inducing=None)
        >>> model = Standardized(net, torch.tensor([100.0, 0.0]), torch.tensor([10.0, 1.0]))
        >>> model(torch.randn(4, 6, 2), torch.ones(4, 6, dtype=torch.bool)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Tensor,
        std: Tensor,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        squeeze: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.squeeze = model, squeeze
        self.dim_input = int(mean.shape[0])
        k = int(getattr(model, "num_outputs", 1) * getattr(model, "dim_output", 1))
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.register_buffer("shift", torch.zeros(k) if shift is None else shift.float().reshape(k).clone())
        self.register_buffer("scale", torch.ones(k) if scale is None else scale.float().reshape(k).clone())

    mean: Tensor
    std: Tensor
    shift: Tensor
    scale: Tensor

    def forward(self, x: Tensor, mask: Tensor | None = None, *, chunk_size: int | None = None) -> Tensor:
        """``x: (B, N, D)`` raw, ``mask: (B, N)`` bool -> ``(B, K)``, or ``(B,)`` when ``squeeze``.

        ``chunk_size``: the wrapped model reads the set ``chunk_size`` elements at a time, each chunk
        standardised as it is read (``x`` may then be any array-like the chunked path takes, one set
        ``(N, D)`` included, and the result has no batch dimension for one set); see
        [`settransformer.nn.streaming`][settransformer.nn.streaming]."""
        if chunk_size is None:
            z = zero_padding((x - self.mean) / self.std, mask)
            out = self.model(z, mask).reshape(x.shape[0], -1)
        else:
            rows = MappedRows(x, self._standardize)
            out = self.model(rows, mask, chunk_size=chunk_size)
            out = out.reshape(-1) if len(rows.shape) == 2 else out.reshape(rows.shape[0], -1)
        out = out * self.scale + self.shift
        return out.reshape(out.shape[:-1]) if self.squeeze else out

    def _standardize(self, x: Tensor) -> Tensor:
        return (x.to(self.mean.device) - self.mean) / self.std


_OPTION_HELP: dict[str, str] = {
    "path": "the labelled sets: a .npz/.h5 file, a .csv file, or a folder of .npy sets with labels.csv",
    "target": "the name of the targets: an array of the .npz/.h5, a column of the .csv or labels.csv",
    "set_column": "the column of set ids in a .csv (or of file names in labels.csv)",
    "val_fraction": "share of the sets held out for validation (val_* metrics)",
    "test_fraction": "share of the sets held out for testing (the reported metrics)",
    "split_seed": "seeds the train/validation/test split",
    "standardize": "standardise each feature by the training sets' mean and std (kept in the model)",
    "encoder": "settransformer encoder: isab (induced attention), sab (full attention) or rff (row-wise MLP)",
    "num_inducing": "inducing points per ISAB",
    "pooling": "pma (attention), mean, sum or max; null: pma for settransformer, mean for deepsets",
    "dim_hidden": "width of every layer",
    "num_heads": "attention heads",
    "num_layers": "encoder layers",
    "dropout": "dropout before pooling and before the output layer",
    "classes": "the class labels in id order; null: the sorted labels found in the file",
    "dim_input": "features per element; null: read from the file (kept, so a run rebuilds without it)",
    "target_shape": "[] for one number per set, [K] for K; null: read from the file (kept like dim_input)",
}


class _LabelledSetTask(Task):
    """Shared by [`SetClassification`][settransformer.tasks.labelled_sets.SetClassification] and
    [`SetRegression`][settransformer.tasks.labelled_sets.SetRegression]: data, splits, models."""

    model_names: ClassVar[tuple[str, ...]] = ("settransformer", "deepsets")
    default_model: ClassVar[str | None] = "settransformer"
    model_descriptions: ClassVar[dict[str, str]] = {
        "settransformer": "Set Transformer: encoder (isab/sab/rff) x num_layers, pooling (pma/mean/sum/max)",
        "deepsets": "DeepSets: row-wise MLP x num_layers, pooling (mean/sum/max), MLP",
    }
    option_help: ClassVar[dict[str, str]] = _OPTION_HELP
    user_data: ClassVar[bool] = True
    classify: ClassVar[bool]
    """Targets are class ids (classification) or standardised numbers (regression)."""

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "path": None,
            "target": "y",
            "set_column": "set",
            "val_fraction": 0.1,
            "test_fraction": 0.2,
            "split_seed": 0,
            "standardize": True,
            "encoder": "isab",
            "num_inducing": 16,
            "pooling": None,
            "dim_hidden": 64,
            "num_heads": 4,
            "num_layers": 2,
            "dropout": 0.0,
            "dim_input": None,
        }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["path"] is None:
            raise ValueError(f"path: {self.name} needs --set path=FILE (a .npz, .h5, .csv or a folder)")
        for key in ("val_fraction", "test_fraction"):
            if not 0 <= o[key] < 1:
                raise ValueError(f"{key}: expected a number in [0, 1), got {o[key]!r}")
        if o["val_fraction"] + o["test_fraction"] >= 1:
            raise ValueError("val_fraction, test_fraction: together they leave no training sets")
        for key, choices in (
            ("encoder", ("isab", "sab", "rff")),
            ("pooling", (None, "pma", "mean", "sum", "max")),
        ):
            if o[key] not in choices:
                raise ValueError(f"{key}: expected one of {', '.join(map(str, choices))}, got {o[key]!r}")
        for key in ("num_inducing", "dim_hidden", "num_heads", "num_layers"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise ValueError(f"{key}: expected a positive integer, got {o[key]!r}")
        if o["dim_hidden"] % o["num_heads"]:
            raise ValueError(f"num_heads: must divide dim_hidden={o['dim_hidden']}, got {o['num_heads']}")
        self._loaded = False
        # A run's options hold everything its model's shape needs (the statistics are buffers in
        # its weights), so predict and export rebuild it without the file; training reads it now.
        if not self._self_contained() or Path(o["path"]).exists():
            self._load()

    def _self_contained(self) -> bool:
        """Whether the options alone determine the model's shape (``dim_input``, outputs)."""
        return self.options["dim_input"] is not None

    def _load(self) -> None:
        """Read the file: the sets, targets, split and the training sets' statistics."""
        o = self.options
        data = read_labelled_sets(
            o["path"], target=o["target"], set_column=o["set_column"], numbers=not self.classify
        )
        self._sets = [torch.from_numpy(np.array(s, dtype=np.float32)) for s in data.sets]
        dim = int(self._sets[0].shape[1])
        if o["dim_input"] not in (None, dim):
            raise ValueError(
                f"dim_input: the run has {o['dim_input']} features per element, {o['path']} {dim}"
            )
        o["dim_input"] = dim
        self._ids = data.ids
        self._targets = self._encode_targets(data.targets)
        strata = self._targets.numpy() if self.classify else None
        parts = split_indices(len(self._sets), o["val_fraction"], o["test_fraction"], o["split_seed"], strata)
        self._split = tuple(torch.from_numpy(p) for p in parts)
        if len(self._split[2]) == 0:
            per_class = ""
            if strata is not None:  # each class is split on its own, rounded
                largest = int(np.bincount(strata).max())
                per_class = (
                    f" (each class is split on its own, and {o['test_fraction']} of the largest class's "
                    f"{largest} rounds to 0)"
                )
            fraction, count = o["test_fraction"], len(self._sets)
            raise ValueError(f"test_fraction: {fraction} of {count} sets leaves no test sets{per_class}")
        if len(self._split[0]) == 0:
            raise ValueError(
                f"val_fraction, test_fraction: {o['val_fraction']} and {o['test_fraction']} of the "
                f"{len(self._sets)} sets of {o['path']} leave no training sets"
            )
        elements = torch.cat([self._sets[i] for i in self._split[0].tolist()])
        if o["standardize"] and len(elements):
            mean, std = elements.mean(0), elements.std(0, correction=0)
            self._stats = (mean, torch.where(std > 0, std, torch.ones_like(std)))
        else:
            self._stats = (torch.zeros(self.dim_input), torch.ones(self.dim_input))
        self._loaded = True

    def _data(self) -> None:
        if not self._loaded:
            if not Path(self.options["path"]).exists():
                raise FileNotFoundError(
                    f"path {self.options['path']}: no such file or folder; the run's model is rebuilt "
                    "without it (predict, export), but its sets are needed here"
                )
            self._load()

    @property
    def sets(self) -> list[Tensor]:
        """The sets, ``(N_i, D)`` each (read from the file on first use)."""
        self._data()
        return self._sets

    @property
    def ids(self) -> list[SetId]:
        """The set ids of the file."""
        self._data()
        return self._ids

    @property
    def targets(self) -> Tensor:
        """Class ids ``(S,)`` or numbers ``(S,)`` / ``(S, K)``."""
        self._data()
        return self._targets

    @property
    def train_idx(self) -> Tensor:
        self._data()
        return self._split[0]

    @property
    def val_idx(self) -> Tensor:
        self._data()
        return self._split[1]

    @property
    def test_idx(self) -> Tensor:
        self._data()
        return self._split[2]

    @property
    def mean(self) -> Tensor:
        """Per-feature mean ``(D,)`` of the training elements: zeros before the file is read (a
        rebuilt run's model then loads the saved statistics with its weights)."""
        return self._stats[0] if self._loaded else torch.zeros(self.dim_input)

    @property
    def std(self) -> Tensor:
        """Per-feature std ``(D,)`` of the training elements (ones before the file is read)."""
        return self._stats[1] if self._loaded else torch.ones(self.dim_input)

    def test_inputs(self) -> tuple[list[Tensor], Tensor]:
        """The raw test sets ``(N_i, D)`` and their targets, as the file holds them."""
        return [self.sets[i] for i in self.test_idx.tolist()], self.targets[self.test_idx]

    def _encode_targets(self, targets: np.ndarray) -> Tensor:
        raise NotImplementedError

    @property
    def dim_input(self) -> int:
        """Features per element ``D``."""
        return int(self.options["dim_input"])

    @property
    def dim_output(self) -> int:
        """Outputs per set: the number of classes, or of regressed values."""
        raise NotImplementedError

    @classmethod
    def budget(cls, name: str) -> dict[str, Any]:
        """``quick``: 300 steps of 32 sets (seconds on a CPU for small files). ``paper``: 3000 steps
        of 64 sets, cosine decay (there is no paper for your data: the name is the longer budget)."""
        if name == "quick":
            return {"steps": 300, "batch_size": 32, "lr": 1e-3, "eval_every": 100}
        if name == "paper":
            return {"steps": 3000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "eval_every": 500}
        raise ValueError(f"budget: expected 'quick' or 'paper', got {name!r}")

    def build_model(self, model_name: str) -> nn.Module:
        """The network of ``model_name`` inside
        [`Standardized`][settransformer.tasks.labelled_sets.Standardized]: raw ``x: (B, N, D)``,
        ``mask: (B, N)`` -> ``(B, classes)`` logits or ``(B,)`` / ``(B, K)`` targets."""
        o, d = self.options, self.dim_input
        net: nn.Module
        if model_name == "settransformer":
            pooling: Any = o["pooling"] or "pma"
            net = SetTransformer(
                d,
                1,
                self.dim_output,
                dim_hidden=o["dim_hidden"],
                num_heads=o["num_heads"],
                num_inducing=o["num_inducing"] if o["encoder"] == "isab" else None,
                encoder="rff" if o["encoder"] == "rff" else "attention",
                pooling=pooling,
                num_encoder_layers=o["num_layers"],
                num_decoder_layers=0 if pooling == "pma" else 1,
                decoder_dropout=o["dropout"],
            )
        elif model_name == "deepsets":
            pool: Any = o["pooling"] or "mean"
            if pool == "pma":
                raise ValueError("pooling: deepsets pools by mean, sum or max, not pma")
            net = DeepSets(
                d,
                1,
                self.dim_output,
                dim_hidden=o["dim_hidden"],
                pool=pool,
                num_encoder_layers=o["num_layers"],
                dropout=o["dropout"],
            )
        else:
            raise ValueError(f"model: expected one of {', '.join(self.model_names)}, got {model_name!r}")
        return self._wrap(net)

    def _wrap(self, net: nn.Module) -> Standardized:
        return Standardized(net, self.mean, self.std)

    def _batch(self, index: Tensor) -> Batch:
        x, mask = pad_sets(
            [self.sets[i] for i in index.tolist()],
            max_size=max(1, *(len(self.sets[i]) for i in index.tolist())),
        )
        return Batch(x, mask, self.targets[index])

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` training sets drawn with replacement: raw ``x: (B, N, D)``, ``mask: (B, N)``."""
        pick = torch.randint(len(self.train_idx), (batch_size,), generator=generator)
        return self._batch(self.train_idx[pick])

    @torch.no_grad()
    def predict(self, model: nn.Module, device: torch.device, split: str = "test") -> tuple[Tensor, Tensor]:
        """``(outputs, targets)`` on CPU for the ``"train"``, ``"val"`` or ``"test"`` sets."""
        index = {"train": self.train_idx, "val": self.val_idx, "test": self.test_idx}[split]
        model.eval()
        outs = []
        for start in range(0, len(index), _EVAL_BATCH):
            b = self._batch(index[start : start + _EVAL_BATCH])
            outs.append(model(b.x.to(device), b.mask.to(device)).float().cpu())  # type: ignore[union-attr]
        return torch.cat(outs), self.targets[index]

    def _metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """The metrics on the test sets, and on the validation sets with a ``val_`` prefix."""
        metrics = self._metrics(*self.predict(model, device, "test"))
        if len(self.val_idx):
            metrics.update(
                {f"val_{k}": v for k, v in self._metrics(*self.predict(model, device, "val")).items()}
            )
        return metrics


class SetClassification(_LabelledSetTask):
    """Classify your own labelled sets (a .npz/.h5/.csv file or a folder of .npy sets; see --list)."""

    name: ClassVar[str] = "set-classification"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    classify: ClassVar[bool] = True

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {**super().default_options(), "classes": None}

    def _self_contained(self) -> bool:
        return super()._self_contained() and self.options["classes"] is not None

    def _encode_targets(self, targets: np.ndarray) -> Tensor:
        if targets.ndim != 1:
            raise ValueError(
                f"{self.options['target']}: expected one class label per set, got shape {targets.shape}"
            )
        found = sorted({_plain(v) for v in targets.tolist()}, key=lambda v: (isinstance(v, str), v))
        classes = self.options["classes"]
        if classes is None:
            classes = self.options["classes"] = found
        repeated = sorted({str(c) for c in classes if classes.count(c) > 1})
        if repeated:
            raise ValueError(f"classes: each label once, got {', '.join(repeated)} more than once")
        unknown = [v for v in found if v not in classes]
        if unknown:
            raise ValueError(f"classes: the file has labels not in classes: {unknown[:5]}")
        if len(classes) < 2:
            where = f"{self.options['path']}: {self.options['target']}"
            raise ValueError(f"{where}: expected at least 2 classes, found {classes}")
        ids = {c: i for i, c in enumerate(classes)}
        return torch.tensor([ids[_plain(v)] for v in targets.tolist()], dtype=torch.long)

    @property
    def class_names(self) -> list[str]:
        """The class labels as text, in id order."""
        return [str(c) for c in self.options["classes"]]

    @property
    def dim_output(self) -> int:
        return len(self.options["classes"])

    def labels(self, outputs: Tensor) -> list[int | str]:
        """The original class labels of the highest logits: ``outputs: (S, classes)`` -> ``S`` labels."""
        return [self.options["classes"][i] for i in outputs.argmax(-1).tolist()]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy of the logits ``(B, classes)`` against the class ids ``(B,)``."""
        return F.cross_entropy(model(batch.x, batch.mask).float(), batch.target)

    def confusion_matrix(self, model: nn.Module, device: torch.device) -> np.ndarray:
        """Counts ``(classes, classes)`` on the test sets: rows true class, columns predicted."""
        outputs, targets = self.predict(model, device)
        k = self.dim_output
        return np.bincount(targets.numpy() * k + outputs.argmax(-1).numpy(), minlength=k * k).reshape(k, k)

    def _metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """``accuracy``, ``macro_f1`` (over the classes present in truth or prediction) and ``loss``."""
        pred = outputs.argmax(-1)
        f1 = []
        for c in torch.unique(torch.cat([pred, targets])).tolist():
            tp = int(((pred == c) & (targets == c)).sum())
            fp, fn = int(((pred == c) & (targets != c)).sum()), int(((pred != c) & (targets == c)).sum())
            f1.append(2 * tp / (2 * tp + fp + fn))
        return {
            "accuracy": float((pred == targets).float().mean()),
            "macro_f1": float(np.mean(f1)),
            "loss": float(F.cross_entropy(outputs, targets)),
        }

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``confusion.png``: the row-normalised confusion matrix on the test sets."""
        from matplotlib.figure import Figure

        counts = self.confusion_matrix(model, device)
        rates = counts / counts.sum(1, keepdims=True).clip(min=1)
        k = len(counts)
        fig = Figure(figsize=(min(12.0, 3 + 0.4 * k), min(11.0, 2.6 + 0.36 * k)))
        ax = fig.subplots()
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), self.class_names, rotation=90)
        ax.set_yticks(range(k), self.class_names)
        for i, j in zip(*np.nonzero(counts)):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
            )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        accuracy = np.trace(counts) / max(1, counts.sum())
        ax.set_title(f"{self.name}: test accuracy {accuracy:.3f}")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
        return [save_figure(fig, Path(out_dir) / "confusion.png")]


class SetRegression(_LabelledSetTask):
    """Regress a number (or a vector) per set from your own sets (a .npz/.h5/.csv file or a folder)."""

    name: ClassVar[str] = "set-regression"
    metric: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False
    classify: ClassVar[bool] = False

    def _encode_targets(self, targets: np.ndarray) -> Tensor:
        if not (np.issubdtype(targets.dtype, np.floating) or np.issubdtype(targets.dtype, np.integer)):
            raise ValueError(
                f"{self.options['target']}: expected numbers to regress, got dtype {targets.dtype}"
            )
        y = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        if not torch.isfinite(y).all():
            raise ValueError(f"{self.options['target']}: expected finite targets")
        shape = list(y.shape[1:])
        if self.options["target_shape"] not in (None, shape):
            raise ValueError(
                f"target_shape: the run has targets of shape {self.options['target_shape']}, the file {shape}"
            )
        self.options["target_shape"] = shape
        return y

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {**super().default_options(), "target_shape": None}

    def _self_contained(self) -> bool:
        return super()._self_contained() and self.options["target_shape"] is not None

    @property
    def dim_output(self) -> int:
        shape = self.options["target_shape"]
        return int(shape[0]) if shape else 1

    def target_scaling(self) -> tuple[Tensor, Tensor]:
        """``(shift, scale)``, each ``(K,)``: the training targets' mean and std (1 where constant;
        0 and 1 before the file is read: a rebuilt run's model loads the saved ones)."""
        if not self._loaded or not self.options["standardize"]:
            return torch.zeros(self.dim_output), torch.ones(self.dim_output)
        y = self.targets[self.train_idx].reshape(len(self.train_idx), -1)
        scale = y.std(0, correction=0)
        return y.mean(0), torch.where(scale > 0, scale, torch.ones_like(scale))

    def _wrap(self, net: nn.Module) -> Standardized:
        shift, scale = self.target_scaling()
        return Standardized(net, self.mean, self.std, shift, scale, squeeze=not self.options["target_shape"])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean squared error in standardised target units (each output weighs the same)."""
        scale = self.target_scaling()[1].to(batch.target.device)
        err = (model(batch.x, batch.mask).float() - batch.target).reshape(len(batch), -1) / scale
        return err.pow(2).mean()

    def _metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """``mae``, ``rmse`` and ``r2`` (the coefficient of determination, averaged over outputs;
        [`r2_score`][settransformer.tasks.metrics.r2_score])."""
        err = outputs - targets
        r2 = r2_score(outputs, targets)
        return {
            "mae": float(err.abs().mean()),
            "rmse": float(err.pow(2).mean().sqrt()),
            "r2": float(r2.mean()),
        }

    def plot(self, model: nn.Module, out_dir: Path, device: torch.device) -> list[Path]:
        """``predicted_vs_true.png``: predicted against true targets on the test sets."""
        from matplotlib.figure import Figure

        outputs, targets = self.predict(model, device)
        pred, true = outputs.reshape(-1).numpy(), targets.reshape(-1).numpy()
        lo, hi = float(min(pred.min(), true.min())), float(max(pred.max(), true.max()))
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="perfect")
        ax.scatter(true, pred, s=8, alpha=0.6, label="test sets")
        ax.set_xlabel(f"true {self.options['target']}")
        ax.set_ylabel(f"predicted {self.options['target']}")
        ax.set_title(f"{self.name}: test MAE {abs(pred - true).mean():.4g}")
        ax.legend(loc="upper left")
        return [save_figure(fig, Path(out_dir) / "predicted_vs_true.png")]


def _plain(value: Any) -> int | float | str:
    """A label as a JSON-friendly value: integers (whole floats too) as ints, other floats as
    floats (so numbers sort among numbers), everything else as text."""
    if isinstance(value, bool | np.bool_):
        return str(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if float(value).is_integer() else float(value)
    return str(value)
