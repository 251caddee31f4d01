"""Batch inference over lists of variable-size sets, and writing the outputs to files.

[`predict`][settransformer.deploy.inference.predict] runs a set model (``forward(x, mask)``) over ``S`` sets
of different sizes: it sorts the sets by size so that each batch pads little, pads them with
[`settransformer.pad_sets`][settransformer.pad_sets], runs the model under `torch.inference_mode`, and returns
the outputs in the input order. A model that also takes query points (``forward(x, mask, queries)``, e.g.
kernel regression's regressors, ``queries: (B, Q, Dq)`` -> ``(B, Q)``) gets each set's queries as its third
input. Outputs are the model's raw ones, one ``model(x, mask)[i]`` per set (for a Set Transformer
``(num_outputs, dim_output)``; logits, not probabilities; mixture parameters, not clusters). A
model with per-element outputs (``(B, N, ...)``, e.g. anomaly scores) gives ``(N_i, ...)`` per set.

[`write_outputs`][settransformer.deploy.inference.write_outputs] writes them as ``.npy`` (one array
``(S, ...)``, rows in input order), ``.csv`` (a ``set`` column and one column per output value; per-element
outputs get one row per element and an ``element`` column) or ``.jsonl`` (``{"set": id, "output": [...]}`` per
line), atomically, refusing to replace a file unless asked.

Examples:
    >>> from settransformer import SetTransformer
    >>> model = SetTransformer(2, num_outputs=4, dim_output=5).eval()
    >>> sets = [torch.randn(n, 2) for n in (120, 1, 45)]
    >>> outs = predict(model, sets, batch_size=2, progress=False)   # 3 tensors (4, 5)
    >>> write_outputs("out.jsonl", ["a", "b", "c"], outs)
    PosixPath('out.jsonl')
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.files import atomic_write, file_in_the_way
from ..large.ragged import size_buckets
from ..nn.sets import pad_sets
from ..nn.validation import check_positive

__all__ = [
    "OUTPUT_SUFFIXES",
    "check_forward",
    "check_output_path",
    "input_dim",
    "jsonl_lines",
    "per_element_output",
    "predict",
    "takes_queries",
    "top_labels",
    "write_outputs",
]

OUTPUT_SUFFIXES = (".npy", ".csv", ".jsonl")


def _required_inputs(model: nn.Module) -> tuple[int, int, bool]:
    """``(required, positional, *args)`` of ``model.forward``: how it can be called."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    params = list(inspect.signature(model.forward).parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(required), len(positional), any(p.kind == p.VAR_POSITIONAL for p in params)


def takes_queries(model: nn.Module) -> bool:
    """Whether ``model`` must be called as ``model(x, mask, queries)`` (three required inputs).

    Examples:
        >>> class AtQueries(torch.nn.Module):
        ...     def forward(self, x, mask, queries):
        ...         return x.sum((1, 2))[:, None] + queries[..., 0]
        >>> takes_queries(AtQueries()), takes_queries(torch.nn.Linear(2, 2))
        (True, False)
    """
    return _required_inputs(model)[0] == 3


def check_forward(model: nn.Module, *, queries: bool = False) -> None:
    """Raise ``ValueError`` unless ``model`` is called as ``model(x, mask)`` (no other inputs), or as
    ``model(x, mask, queries)`` when ``queries``."""
    required, positional, varargs = _required_inputs(model)
    n = 3 if queries else 2
    if required > n or (positional < n and not varargs):
        params = ", ".join(inspect.signature(model.forward).parameters)
        hint = (
            "; it takes query points: store them beside the sets as 'queries' (S, Q, Dq) or "
            "'query_values' + 'query_offsets'"
            if not queries and required == 3
            else ""
        )
        raise ValueError(
            f"model: predict supports models with forward(x, mask{', queries' if queries else ''}); "
            f"{_shown(model)} has forward({params}){hint}"
        )


def input_dim(model: nn.Module) -> int | None:
    """The feature size ``D`` of the elements ``model`` takes, or ``None`` when it cannot tell.

    Reads ``dim_input`` (set models), an image encoder's ``image_shape`` (``C*H*W``), or the
    ``model`` a wrapper holds.
    """
    dim = getattr(model, "dim_input", None)
    if isinstance(dim, int):
        return dim
    shape = getattr(getattr(model, "encoder", None), "image_shape", None)
    if shape is not None:
        return int(math.prod(shape))
    inner = getattr(model, "model", None)
    return input_dim(inner) if isinstance(inner, nn.Module) else None


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype if p.is_floating_point() else torch.float32


def per_element_output(model: nn.Module, dim_input: int) -> bool:
    """Whether ``model`` returns one output per element (``(B, N, ...)``) rather than per set.

    Found by running it on two tiny sets of sizes 2 and 3 (zeros); an output whose shape changes
    with the set size elsewhere than the element axis is a ``ValueError``.
    """
    device, dtype = _placement(model)
    shapes = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for n in (2, 3):
                x = torch.zeros(1, n, dim_input, dtype=dtype, device=device)
                shapes.append(tuple(model(x, torch.ones(1, n, dtype=torch.bool, device=device)).shape))
    finally:
        model.train(was_training)
    if len(shapes[0]) == 0 or shapes[0][0] != 1:
        raise ValueError(f"model: expected an output with a batch dimension (B, ...), got shape {shapes[0]}")
    if shapes[0] == shapes[1]:
        return False
    if len(shapes[0]) >= 2 and (shapes[0][1], shapes[1][1]) == (2, 3) and shapes[0][2:] == shapes[1][2:]:
        return True
    raise ValueError(
        f"model: its output shape changes with the set size ({shapes[0]} for 2 elements, {shapes[1]} "
        "for 3), other than as per-element outputs (B, N, ...); predict does not support it"
    )


def _check_set(s: Any, i: int, dim: int | None, name: str = "sets") -> Any:
    shape = tuple(getattr(s, "shape", ()))
    expected = f"a set of shape (N_i, {dim if dim is not None else 'D'})"
    if not isinstance(s, Tensor | np.ndarray):
        raise TypeError(f"{name}[{i}]: expected {expected} (tensor or NumPy array), got {type(s).__name__}")
    if len(shape) != 2 or (dim is not None and shape[1] != dim):
        raise ValueError(f"{name}[{i}]: expected {expected}, got shape {shape}")
    # as the models: a set of any size, streamed in chunks or not, must be floating point
    floating = s.is_floating_point() if isinstance(s, Tensor) else np.issubdtype(s.dtype, np.floating)
    if not floating:
        convert = ".float()" if isinstance(s, Tensor) else ".astype(np.float32)"
        raise TypeError(
            f"{name}[{i}]: expected floating-point values, got dtype {s.dtype} (convert with {convert})"
        )
    return s


def _as_sequence(sets: Any, name: str) -> Sequence[Any]:
    """``sets`` as a sequence: a generator or another iterable is read into a list (its sets are
    indexed more than once)."""
    if isinstance(sets, Sequence | Tensor | np.ndarray):
        return sets  # type: ignore[return-value]
    if isinstance(sets, Iterable):
        return list(sets)
    raise TypeError(f"{name}: expected a sequence of sets (N_i, D), got {type(sets).__name__}")


def _finite(s: Tensor, i: int) -> Tensor:
    """``s``, the set ``sets[i]``, if its values are finite; the model's own check would name a
    position in the padded, size-sorted batch, not the set."""
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"sets[{i}]: element {row}, feature {col} is {s[row, col].item()} (inputs must be finite)"
        )
    return s


def _to_tensor(s: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(s, Tensor):
        return s.detach().to("cpu", dtype)
    return torch.tensor(np.asarray(s), dtype=dtype)  # a copy: memmaps are read-only


def _shown(model: nn.Module) -> str:
    """How messages name ``model``: its class, or the model inside a private wrapper class."""
    name = type(model).__name__
    if not name.startswith("_"):
        return name
    inner = getattr(model, "model", None)
    return f"the wrapped {_shown(inner)}" if isinstance(inner, nn.Module) else "this model"


def top_labels(outputs: Sequence[Tensor], classes: Sequence[Any]) -> list[Any]:
    """The class of each set's highest output: ``classes[argmax]`` per output of
    ``(len(classes),)`` values (any leading size-1 dimensions, e.g. ``(1, C)``, are fine).

    Examples:
        >>> top_labels([torch.tensor([0.1, 2.0]), torch.tensor([[3.0, -1.0]])], ["cat", "dog"])
        ['dog', 'cat']
    """
    labels = []
    for i, out in enumerate(outputs):
        if out.numel() != len(classes):
            raise ValueError(
                f"outputs[{i}]: expected one value per class ({len(classes)}), got shape {tuple(out.shape)}"
            )
        labels.append(classes[int(out.reshape(-1).argmax())])
    return labels


def _bar(total: int, enabled: bool) -> Any:
    # stderr piped to a file or another program: no bar (its \r updates would fill the log); a
    # notebook's stderr (ipykernel's stream) is no terminal either, but tqdm.auto draws a widget there
    shown = sys.stderr.isatty() or type(sys.stderr).__module__.startswith("ipykernel")
    if not (enabled and shown):
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `train` extra: no bar without it
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc="predict", unit="set", dynamic_ncols=True)


def predict(
    model: nn.Module,
    sets: Sequence[Tensor | np.ndarray],
    *,
    queries: Sequence[Tensor | np.ndarray] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> list[Tensor]:
    """``model`` over every set, batched with masks; outputs in the order of ``sets``.

    Args:
        model: a set model called as ``model(x (B, N, D), mask (B, N))``; put in eval mode for the
            call (its mode is restored after).
        sets: ``S`` tensors or NumPy arrays (memmaps included) ``(N_i, D)``; ``N_i`` may be 0.
        queries: for models called as ``model(x, mask, queries (B, Q, Dq)) -> (B, Q, ...)``: ``S``
            query sets ``(Q_i, Dq)``, one per set. A batch pads them with zeros to its longest
            ``Q_i`` (such a model answers each query on its own) and cuts each output to ``Q_i``.
        batch_size: sets per forward pass; sets are sorted by size first, so a batch pads little.
        device: where to run (the model is moved there, in place); ``None``: where the model is.
        chunk_size: evaluate ``chunk_size`` elements at a time with bounded memory (models whose
            forward takes ``chunk_size``, see [`settransformer.nn.streaming`][settransformer.nn.streaming]); a
            set larger than this is evaluated alone, read from its array one chunk at a time.
        progress: a tqdm bar (on stderr) over the sets, when tqdm is installed.

    Returns:
        ``S`` CPU tensors: ``model(x, mask)[i]`` of set ``i`` (e.g. ``(num_outputs, dim_output)``),
            cut to ``(N_i, ...)`` for per-element outputs, or ``(Q_i, ...)`` with ``queries``; equal to
            running each set alone, unpadded.

    Examples:
        >>> class AtQueries(torch.nn.Module):  # (B, N, 2), (B, N), (B, Q, 1) -> (B, Q)
        ...     def forward(self, x, mask, queries):
        ...         return x.sum((1, 2))[:, None] + queries[..., 0]
        >>> context = [torch.randn(n, 2) for n in (30, 7)]
        >>> queries = [torch.rand(q, 1) for q in (4, 9)]
        >>> [tuple(o.shape) for o in predict(AtQueries(), context, queries=queries, progress=False)]
        [(4,), (9,)]
    """
    check_forward(model, queries=queries is not None)
    check_positive("batch_size", batch_size)
    if chunk_size is not None:
        check_positive("chunk_size", chunk_size)
        if "chunk_size" not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"chunk_size: {_shown(model)} has no chunked forward (SetTransformer and DeepSets have "
                "one); leave chunk_size out to evaluate each set whole"
            )
    sets = _as_sequence(sets, "sets")
    if queries is not None:
        queries = _as_sequence(queries, "queries")
    if len(sets) == 0:
        return []
    dim = input_dim(model)
    if dim is None:  # a model that does not say: every set must have the first one's size
        dim = int(_check_set(sets[0], 0, None).shape[1])
    sets = [_check_set(s, i, dim) for i, s in enumerate(sets)]
    if queries is not None:
        if len(queries) != len(sets):
            raise ValueError(f"queries: expected one query set per set ({len(sets)}), got {len(queries)}")
        dq = int(_check_set(queries[0], 0, None, "queries").shape[1])
        queries = [_check_set(q, i, dq, "queries") for i, q in enumerate(queries)]
    if device is not None:
        model.to(torch.device(device))
    dev, dtype = _placement(model)
    per_element = queries is None and per_element_output(model, dim)
    sizes = [int(s.shape[0]) for s in sets]
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    outputs: list[Tensor | None] = [None] * len(sets)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _bar(len(sets), progress) as bar:
            for batch in size_buckets(sizes, slack=math.inf, max_sets=batch_size, alone_above=chunk_size):
                if chunk_size is not None and sizes[batch[0]] > chunk_size:
                    out = model(sets[batch[0]], None, **kwargs)[None]  # read chunk by chunk
                else:
                    # At least one padded position, so that a batch of empty sets is still (B, 1, D).
                    longest = max(1, max(sizes[i] for i in batch))
                    x, mask = pad_sets(
                        [_finite(_to_tensor(sets[i], dtype), i) for i in batch], max_size=longest
                    )
                    if queries is None:
                        out = model(x.to(dev), mask.to(dev), **kwargs)
                    else:
                        q, _ = pad_sets([_to_tensor(queries[i], dtype) for i in batch])
                        out = model(x.to(dev), mask.to(dev), q.to(dev))
                out = out.cpu()
                for j, i in enumerate(batch):
                    if queries is not None:
                        outputs[i] = out[j, : int(queries[i].shape[0])]
                    else:
                        outputs[i] = out[j, : sizes[i]] if per_element else out[j]
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
    # Plain tensors (not inference tensors), so callers may use them anywhere.
    return [o.clone() for o in outputs if o is not None]


# -- writing ---------------------------------------------------------------------------------


def check_output_path(path: str | Path, *, overwrite: bool = False) -> Path:
    """``path`` as a `Path` if it is a writable output: a known suffix, and no existing file
    unless ``overwrite``. Raises ``ValueError`` otherwise."""
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{p}: unknown output format {p.suffix!r}; expected {', '.join(OUTPUT_SUFFIXES)}")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; expected an output file name")
    if p.exists() and not overwrite:
        raise ValueError(f"{p}: already exists; pass overwrite=True to replace it")
    blocking = file_in_the_way(p)
    if blocking is not None:
        raise ValueError(f"{p}: {blocking} is a file, not a folder")
    return p


def _texts(a: np.ndarray) -> list[str]:
    """Each value as the shortest text that reads back to the same number in its dtype."""
    if a.dtype in (np.float32, np.float16):
        return [str(v) for v in a.ravel()]  # NumPy prints the shortest round-trip of a float32
    return [repr(float(v)) for v in a.ravel()]


def _numpy(t: Tensor) -> np.ndarray:
    """``t`` as a NumPy array; bfloat16, which NumPy lacks, as float32 (every bfloat16 value is one)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _nested(a: np.ndarray) -> Any:
    values = [float(t) for t in _texts(a)]
    return np.array(values, dtype=np.float64).reshape(a.shape).tolist()


def jsonl_lines(
    ids: Sequence[Any], outputs: Sequence[Tensor], *, labels: Sequence[Any] | None = None
) -> Iterator[str]:
    """``{"set": id, "output": [...]}`` per set (no newline), with ``"label"`` when ``labels`` are
    given; NaN and inf are written as ``NaN`` / ``Infinity``, which Python's json reads."""
    for i, (set_id, out) in enumerate(zip(ids, outputs)):
        record: dict[str, Any] = {"set": set_id, "output": _nested(_numpy(out))}
        if labels is not None:
            record["label"] = labels[i]
        yield json.dumps(record)


def _column_names(shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return ["output"]
    return ["output_" + "_".join(map(str, idx)) for idx in itertools.product(*(range(n) for n in shape))]


def _write_csv(
    f: IO[str],
    ids: Sequence[Any],
    arrays: list[np.ndarray],
    per_element: bool,
    labels: Sequence[Any] | None = None,
) -> None:
    w = csv.writer(f, lineterminator="\n")
    if not arrays:  # no sets: the header of the columns every row has
        w.writerow(["set", *(["label"] if labels is not None else [])])
        return
    inner = arrays[0].shape[1:] if per_element else arrays[0].shape
    label = ["label"] if labels is not None else []
    w.writerow(["set", *label, *(["element"] if per_element else []), *_column_names(inner)])
    for i, (set_id, a) in enumerate(zip(ids, arrays)):
        cell = [_csv_safe(set_id), *([_csv_safe(labels[i])] if labels is not None else [])]
        if per_element:
            for k, row in enumerate(a):
                w.writerow([*cell, k, *_texts(np.asarray(row))])
        else:
            w.writerow([*cell, *_texts(a)])


def _csv_safe(value: Any) -> Any:
    """A set id as a CSV cell that a spreadsheet shows as text: ids starting with ``= + - @`` (or a
    tab or carriage return) get a leading ``'`` so they are never run as formulas."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_outputs(
    path: str | Path,
    ids: Sequence[Any],
    outputs: Sequence[Tensor],
    *,
    per_element: bool = False,
    labels: Sequence[Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``outputs`` (one tensor per set, as [`predict`][settransformer.deploy.inference.predict] returns)
    to ``path``.

    The format follows the suffix: ``.npy`` (``np.stack``: every output must have the same shape),
    ``.csv`` or ``.jsonl``; see the module docstring. ``per_element``: the outputs are
    ``(N_i, ...)`` per element (CSV: one row per element). The file is written to a temporary
    name and renamed, so an interrupted write leaves no partial file. ``labels``: one value per
    set (e.g. [`top_labels`][settransformer.deploy.inference.top_labels]), written as a ``label`` column
    (``.csv``) or field (``.jsonl``).
    """
    p = check_output_path(path, overwrite=overwrite)
    if len(ids) != len(outputs):
        raise ValueError(f"ids, outputs: expected one id per output, got {len(ids)} and {len(outputs)}")
    if labels is not None and len(labels) != len(outputs):
        raise ValueError(f"labels: expected one label per output, got {len(labels)} and {len(outputs)}")
    arrays = [_numpy(o) for o in outputs]
    shapes = {a.shape[1:] if per_element else a.shape for a in arrays}
    if len(shapes) > 1:
        what = "element" if per_element else "set"
        raise ValueError(f"outputs: expected one shape per {what}, got {sorted(shapes)}")
    suffix = p.suffix.lower()
    if suffix == ".npy" and labels is not None:
        raise ValueError(f"{p}: labels need .csv or .jsonl (.npy holds only the outputs)")
    if suffix == ".npy":
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"{p}: per-element outputs of sets of different sizes do not stack into one array; "
                "write .csv or .jsonl"
            )
        stacked = np.stack(arrays) if arrays else np.zeros((0,), np.float32)
        atomic_write(p, lambda f: np.save(f, stacked, allow_pickle=False))
    elif suffix == ".csv":
        atomic_write(p, _text_writer(lambda f: _write_csv(f, ids, arrays, per_element, labels)))
    else:
        atomic_write(
            p,
            _text_writer(
                lambda f: f.writelines(line + "\n" for line in jsonl_lines(ids, outputs, labels=labels))
            ),
        )
    return p


def _text_writer(write: Callable[[IO[str]], None]) -> Callable[[IO[bytes]], None]:
    def run(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()  # leave the binary file open for atomic_write to close

    return run
