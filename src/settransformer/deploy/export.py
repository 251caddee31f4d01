"""Export a set model for inference outside PyTorch training code: ONNX and TorchScript files.

Both formats are traced from the model and take two inputs, with a dynamic batch size ``B`` and
set size ``N`` (``N >= 1``; express an empty set as a row of ``mask`` that is all False):

- ``x``: ``(B, N, dim_input)``, the model's floating dtype (float32 for the models trained here),
  padded sets; padded rows may hold anything, they are ignored;
- ``mask``: ``(B, N)`` bool, True for real elements;

and, for a model called as ``model(x, mask, queries)`` (``dim_query`` given; the
``kernel-regression`` task's), a third one with a dynamic number of queries ``Q >= 1``:

- ``queries``: ``(B, Q, dim_query)``, the model's floating dtype, the points each set is asked about;

and return the model's output (``(B, num_outputs, dim_output)`` for a
[`SetTransformer`][settransformer.SetTransformer]), named ``output`` in the ONNX graph. Both exports run
the model in evaluation mode (no dropout).

Examples: [`export_onnx`][settransformer.deploy.export.export_onnx] and
[`export_torchscript`][settransformer.deploy.export.export_torchscript].

Tracing bakes Python control flow into the graph, so two things are taken care of here:

- The attention blocks pick a form of the attention by cost from the set size
  ([`choose_form`][settransformer.nn.mab.MAB.choose_form]). The forms are exact rewrites of each
  other, but a trace keeps one of them for every size: the one chosen for the example's size, or
  the plain form when the tracer hands sizes over as tensors (about 1.5x slower in ONNX Runtime
  for the MoG model). During export every block is pinned to the form it uses for large sets
  ([`large_set_forms`][settransformer.nn.mab.large_set_forms], what ``torch.export`` picks with a symbolic
  set size); which side of each attention grows with the set size is found by running the model
  at two sizes first.
- The written file is checked (``onnx.checker``), then run (in ONNX Runtime when it is
  installed; ``torch.jit.load`` for TorchScript) on padded batches of sizes not used at export,
  one of them with an empty set, and compared with the eager model (atol = rtol = 1e-4). A
  model whose output depends on the sizes in a way the trace cannot follow fails here with
  [`ExportError`][settransformer.deploy.export.ExportError] instead of writing a wrong file.

The file is written to a temporary name beside ``path`` and renamed only once it passed the
checks, so a failed export never leaves a half-written file or replaces an existing one.

ONNX export needs the ``onnx`` package (``pip install 'settransformer[onnx]'``, which also
installs ``onnxruntime``). It uses PyTorch's TorchScript-based exporter by default (about a second
for the paper's models); ``dynamo=True`` selects the ``torch.export``-based one (needs
``onnxscript``; tens of seconds on CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.files import atomic_path, file_in_the_way
from ..nn.mab import MAB, large_set_forms
from ..nn.scores import AdditiveScore
from ..nn.sequence import SequenceSetModel
from ..nn.validation import check_positive

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "QUERIES_NAME",
    "ExportError",
    "check_opset",
    "export_onnx",
    "export_torchscript",
]

INPUT_NAMES = ("x", "mask")
"""Names of the inputs of an exported ONNX graph, in order."""
OUTPUT_NAME = "output"
"""Name of the output of an exported ONNX graph."""
QUERIES_NAME = "queries"
"""Name of the third input of the graph of a model called as ``model(x, mask, queries)``."""
DEFAULT_OPSET = 18
"""ONNX opset when none is given (ONNX Runtime >= 1.14 runs it; LayerNormalization needs 17+)."""

_EXAMPLE = (2, 8, 3)  # (B, N, Q) traced; B > 1 so that broadcasting over the batch is traced as such
_PROBE_SIZE = (11, 5)  # a second (N, Q), to tell which attention sizes grow with N or Q
_CHECK_SIZES = ((3, 13, 4), (1, 1, 1), (5, 40, 9))  # (B, N, Q) compared after export; none of them traced
_TOLERANCE = 1e-4  # atol and rtol of the comparison


class ExportError(ValueError):
    """The model cannot be exported, or the exported file does not agree with the model.

    Examples:
        >>> class Broken(torch.nn.Module):
        ...     def forward(self, x, mask):
        ...         raise RuntimeError("boom")
        >>> try:
        ...     export_torchscript(Broken(), "broken.pt", dim_input=2)
        ... except ExportError as e:
        ...     print(isinstance(e, ValueError), str(e)[:35])
        True model: Broken(x, mask) failed on an
    """


def check_opset(opset: int | None, dynamo: bool = False) -> int:
    """``opset`` (``None``: [`DEFAULT_OPSET`][settransformer.deploy.export.DEFAULT_OPSET]) if the
    exporter writes it: 14 to 20, or at least 18 with ``dynamo``; else a ``ValueError``.

    Examples:
        >>> check_opset(None) == DEFAULT_OPSET, check_opset(14)
        (True, 14)
    """
    if opset is None:
        return DEFAULT_OPSET
    low, high = (18, None) if dynamo else (14, 20)  # 20: the TorchScript-based exporter's newest
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < low or (high and opset > high):
        allowed = f"{low} to {high}" if high else f"at least {low}"
        raise ValueError(f"opset: expected an ONNX opset version {allowed}, got {opset!r}")
    return opset


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    dim_input: int,
    dim_query: int | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    dynamo: bool = False,
) -> Path:
    """Write ``model`` as an ONNX graph ``(x: (B, N, dim_input), mask: (B, N) bool) -> output``.

    A model called as ``model(x, mask, queries)`` gets a third input ``queries: (B, Q, dim_query)``.

    Args:
        model: called as ``model(x, mask)`` (or ``model(x, mask, queries)``), returning one tensor.
        path: the ``.onnx`` file to write (its folder is created).
        dim_input: feature size of the set elements.
        dim_query: feature size of the query points, for a model that takes them (required
            then, refused otherwise).
        opset: ONNX opset (default [`DEFAULT_OPSET`][settransformer.deploy.export.DEFAULT_OPSET]; 14 to 20, or
            18+ with ``dynamo``).
        overwrite: replace an existing file (otherwise `FileExistsError`).
        verify: run the file in ONNX Runtime (when installed) on padded batches of other sizes
            and compare with ``model`` (atol = rtol = 1e-4).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript-based one.

    Returns:
        ``path``.

    Raises:
        ExportError: the export or the comparison failed (a ``ValueError``).
        TypeError: ``model`` is not called as ``model(x, mask)`` (or ``model(x, mask, queries)`` with
            ``dim_query``).
        ImportError: the ``onnx`` package is not installed.

    Examples:
        >>> import onnx
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(2, num_outputs=1, dim_output=3, dim_hidden=8, num_heads=2, num_inducing=2)
        >>> path = export_onnx(model, "model.onnx", dim_input=2)
        >>> [i.name for i in onnx.load(path).graph.input], [o.name for o in onnx.load(path).graph.output]
        (['x', 'mask'], ['output'])

        A model that is asked about query points, each answered by a weighted mean of the set:

        >>> class AtQueries(torch.nn.Module):
        ...     def forward(self, x, mask, queries):
        ...         scores = (queries @ x.transpose(1, 2)).masked_fill(~mask[:, None], -1e9)
        ...         return scores.softmax(-1) @ x
        >>> path = export_onnx(AtQueries(), "at-queries.onnx", dim_input=2, dim_query=2)
        >>> [i.name for i in onnx.load(path).graph.input]
        ['x', 'mask', 'queries']
    """
    opset = check_opset(opset, dynamo)
    for package in ("onnx", "onnxscript") if dynamo else ("onnx",):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"export_onnx needs the {package} package: pip install 'settransformer[onnx]'")
    import onnx

    example, dtype = _prepare(model, dim_input, dim_query)
    _check_onnx_exportable(model)
    names = _input_names(example)

    def write(tmp: Path, wrapper: nn.Module) -> None:
        options: dict[str, object] = {"input_names": list(names), "output_names": [OUTPUT_NAME]}
        if dynamo:
            batch, size = torch.export.Dim("batch"), torch.export.Dim("set")
            shapes = {"x": {0: batch, 1: size}, "mask": {0: batch, 1: size}}
            if QUERIES_NAME in names:
                shapes[QUERIES_NAME] = {0: batch, 1: torch.export.Dim("queries")}
            options["dynamic_shapes"] = shapes
            options["external_data"] = False
        else:
            axes = {name: {0: "batch", 1: "set"} for name in INPUT_NAMES}
            options["dynamic_axes"] = (
                {**axes, QUERIES_NAME: {0: "batch", 1: "queries"}} if len(names) > 2 else axes
            )
        with _stdout_to_devnull():
            torch.onnx.export(wrapper, example, str(tmp), dynamo=dynamo, opset_version=opset, **options)  # type: ignore[arg-type]
        onnx.checker.check_model(str(tmp), full_check=True)

    def load(tmp: Path) -> Callable[..., Tensor] | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

        def run(*inputs: Tensor) -> Tensor:
            feed = {name: t.cpu().numpy() for name, t in zip(names, inputs, strict=True)}
            return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])

        return run

    return _export(model, Path(path), example, dtype, write, load if verify else None, overwrite, "ONNX")


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    dim_input: int,
    dim_query: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``model`` traced as TorchScript: ``torch.jit.load(path)(x, mask)``, no Python source needed.

    A model called as ``model(x, mask, queries)`` is loaded back as ``torch.jit.load(path)(x, mask,
    queries)``, ``queries: (B, Q, dim_query)``.

    Args:
        model: called as ``model(x, mask)`` (or ``model(x, mask, queries)``), returning one tensor.
        path: the file to write (``.pt`` by convention; its folder is created).
        dim_input: feature size of the set elements.
        dim_query: feature size of the query points, for a model that takes them (required
            then, refused otherwise).
        overwrite: replace an existing file (otherwise `FileExistsError`).
        verify: load the file back and compare with ``model`` on padded batches of other sizes.

    Returns:
        ``path``; errors as [`export_onnx`][settransformer.deploy.export.export_onnx]. The graph is traced on
            the model's device.

    Examples:
        >>> from settransformer import SetTransformer
        >>> model = SetTransformer(2, num_outputs=1, dim_output=3, dim_hidden=8, num_heads=2, num_inducing=2)
        >>> loaded = torch.jit.load(export_torchscript(model, "model.pt", dim_input=2))
        >>> loaded(torch.randn(4, 5, 2), torch.ones(4, 5, dtype=torch.bool)).shape
        torch.Size([4, 1, 3])
    """
    example, dtype = _prepare(model, dim_input, dim_query)

    def write(tmp: Path, wrapper: nn.Module) -> None:
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(tmp))

    def load(tmp: Path) -> Callable[..., Tensor]:
        return torch.jit.load(str(tmp), map_location=example[0].device)

    return _export(
        model, Path(path), example, dtype, write, load if verify else None, overwrite, "TorchScript"
    )


class _Inference(nn.Module):
    """``model(x, mask)`` with exactly these two inputs (models may take more, optional, ones)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x: (B, N, dim_input)``, ``mask: (B, N)`` bool -> the model's output."""
        return self.model(x, mask)


class _InferenceAtQueries(_Inference):
    """``model(x, mask, queries)`` with exactly these three inputs."""

    def forward(self, x: Tensor, mask: Tensor, queries: Tensor) -> Tensor:  # type: ignore[override]
        """``x: (B, N, dim_input)``, ``mask: (B, N)`` bool, ``queries: (B, Q, dim_query)`` -> the
        model's output."""
        return self.model(x, mask, queries)


def _check_signature(model: object, queries: bool) -> None:
    """``TypeError`` unless ``model`` is a module that can be called as ``model(x, mask)``, or as
    ``model(x, mask, queries)`` when ``queries``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    P = inspect.Parameter
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    n = 3 if queries else 2
    takes = f"{type(model).__name__}.forward takes ({', '.join(p.name for p in params)})"
    if len(required) == 3 and not queries:
        raise TypeError(
            f"model: {takes}: a model called as model(x, mask, queries) needs dim_query, the feature "
            "size of the query points"
        )
    if len(required) > n or (len(positional) < n and not any(p.kind is P.VAR_POSITIONAL for p in params)):
        call = "model(x, mask, queries)" if queries else "model(x, mask)"
        raise TypeError(f"model: export needs a model called as {call} -> Tensor; {takes}")


def _input_names(example: tuple[Tensor, ...]) -> tuple[str, ...]:
    """The graph's input names for the inputs in ``example``."""
    return (*INPUT_NAMES, QUERIES_NAME) if len(example) > 2 else INPUT_NAMES


def _example(
    b: int, n: int, dim_input: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A padded batch ``x: (b, n, dim_input)``, ``mask: (b, n)``: padding in the middle of the
    sets, junk in the padded rows, and (for ``b > 2``) an empty last set."""
    gen = torch.Generator().manual_seed(1000 * b + n)
    x = torch.randn(b, n, dim_input, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.3
    mask[:, 0] = True
    if b > 2:
        mask[-1] = False
    x = x.masked_fill(~mask[..., None], 1e4)  # the model must ignore padded values
    return x.to(device=device, dtype=dtype), mask.to(device)


def _queries(b: int, q: int, dim_query: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Query points ``(b, q, dim_query)``."""
    gen = torch.Generator().manual_seed(1000 * b + q + 7)
    return torch.randn(b, q, dim_query, generator=gen).to(device=device, dtype=dtype)


def _inputs(
    b: int, n: int, q: int, dim_input: int, dim_query: int | None, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """`_example`'s ``(x, mask)``, with `_queries` ``(b, q, dim_query)`` when ``dim_query``."""
    x, mask = _example(b, n, dim_input, dtype, device)
    return (x, mask) if dim_query is None else (x, mask, _queries(b, q, dim_query, dtype, device))


def _prepare(
    model: nn.Module, dim_input: int, dim_query: int | None
) -> tuple[tuple[Tensor, ...], torch.dtype]:
    """Check ``model``, ``dim_input`` and ``dim_query``; the example inputs of the trace and the
    model's dtype."""
    _check_signature(model, dim_query is not None)
    check_positive("dim_input", dim_input)
    if dim_query is not None:
        check_positive("dim_query", dim_query)
    declared = getattr(model, "dim_input", None)
    if isinstance(declared, int) and declared != dim_input:
        raise ValueError(f"dim_input: the model takes sets of {declared} features, got {dim_input}")
    _check_exportable_attention(model)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    device = floats[0].device if floats else torch.device("cpu")
    example = _inputs(*_EXAMPLE, dim_input, dim_query, dtype, device)
    out = _call(model, example)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"model: export needs a model that returns one tensor; {type(model).__name__} returned "
            f"{type(out).__name__}"
        )
    return example, dtype


def _check_exportable_attention(model: nn.Module) -> None:
    """[`ExportError`][settransformer.deploy.export.ExportError] for attention a graph cannot hold for
    every set size: hard ``top_k`` attention (the trace fixes ``k`` against the example's set size, and
    ONNX has no in-place mask ops) and the additive score (a hand-written autograd function, and a
    form chosen by the sizes of the example)."""
    for name, module in model.named_modules():
        if not isinstance(module, MAB):
            continue
        where = name or type(model).__name__
        if module.top_k is not None:
            raise ExportError(
                f"model: {where} uses hard top_k={module.top_k} attention, which export does not support "
                "(the graph would fix k against the example's set size); export a model with soft attention"
            )
        if isinstance(module.score, AdditiveScore):
            raise ExportError(
                f"model: {where} uses the additive score, which export does not support (its kernel is a "
                "Python autograd function); the dot-product and Gaussian-kernel scores export"
            )


def _check_onnx_exportable(model: nn.Module) -> None:
    """[`ExportError`][settransformer.deploy.export.ExportError] for the order-aware baselines, which
    gather each set's real elements with a stable sort that ONNX lacks."""
    for name, module in model.named_modules():
        if isinstance(module, SequenceSetModel):
            where = name or type(model).__name__
            raise ExportError(
                f"model: {where} is an order-aware baseline ({module.kind}), whose stable sort of the real "
                "elements ONNX cannot express; export it to TorchScript (lstm and transformer kinds)"
            )


def _call(model: nn.Module, example: tuple[Tensor, ...]) -> object:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*example)
    except Exception as e:  # any failure of the user's model: name what it was given
        x, mask = example[:2]
        names = ", ".join(_input_names(example))
        at = f", queries: {tuple(example[2].shape)}" if len(example) > 2 else ""
        raise ExportError(
            f"model: {type(model).__name__}({names}) failed on an example batch x: {tuple(x.shape)} "
            f"{x.dtype}, mask: {tuple(mask.shape)} bool{at} ({type(e).__name__}: {e})"
        ) from e
    finally:
        model.train(was_training)


def _large_set_forms(
    model: nn.Module, example: tuple[Tensor, ...]
) -> contextlib.AbstractContextManager[None]:
    """[`large_set_forms`][settransformer.nn.mab.large_set_forms], probing at ``example``'s sizes and at
    ``_PROBE_SIZE`` elements and queries (both grow in the exported graph)."""
    x = example[0]
    dim_query = example[2].shape[2] if len(example) > 2 else None
    probe = _inputs(x.shape[0], *_PROBE_SIZE, x.shape[2], dim_query, x.dtype, x.device)
    return large_set_forms(model, example, probe, lambda batch: _call(model, batch))


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """Discard what native code writes to the process's stdout (file descriptor 1).

    When it fails, PyTorch's TorchScript-based ONNX exporter prints its whole graph there (its log
    switch ends up always on), which would bury the one-line error of the CLI.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _export(
    model: nn.Module,
    path: Path,
    example: tuple[Tensor, ...],
    dtype: torch.dtype,
    write: Callable[[Path, nn.Module], None],
    load: Callable[[Path], Callable[..., Tensor] | None] | None,
    overwrite: bool,
    kind: str,
) -> Path:
    """Trace ``model`` into a temporary file with ``write``, check it with ``load``, rename it to ``path``."""
    if path.is_dir():
        raise ValueError(f"path: {path} is a folder; expected a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ValueError(f"path: {path}: {blocking} is a file, not a folder")
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # TracerWarnings about Python branches on sizes, deprecation notices of the exporters:
            # the comparison below is what tells whether the trace is right.
            warnings.simplefilter("ignore")
            try:
                with _large_set_forms(model, example), torch.no_grad():
                    wrapper = _InferenceAtQueries(model) if len(example) > 2 else _Inference(model)
                    write(tmp, wrapper.eval())
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(
                    f"{kind} export of {type(model).__name__} failed ({type(e).__name__}: {e})"
                ) from e
            try:
                run = load(tmp) if load is not None else None
            except Exception as e:
                raise ExportError(f"the {kind} file does not load ({type(e).__name__}: {e})") from e
            if run is not None:
                dim_query = example[2].shape[2] if len(example) > 2 else None
                _compare(model, run, example[0].shape[2], dim_query, dtype, example[0].device, kind)
    finally:
        model.train(was_training)
    return path


def _compare(
    model: nn.Module,
    run: Callable[..., Tensor],
    dim_input: int,
    dim_query: int | None,
    dtype: torch.dtype,
    device: torch.device,
    kind: str,
) -> None:
    """[`ExportError`][settransformer.deploy.export.ExportError] unless ``run`` agrees with ``model`` on
    padded batches of untraced sizes."""
    for b, n, q in _CHECK_SIZES:
        inputs = _inputs(b, n, q, dim_input, dim_query, dtype, device)
        at = f" with {q} queries" if dim_query is not None else ""
        with torch.no_grad():
            expected = model(*inputs)
            try:
                got = run(*inputs).to(expected.device)
            except Exception as e:
                raise ExportError(
                    f"the {kind} export of {type(model).__name__} fails on a batch of {b} sets of size {n}"
                    f"{at} ({type(e).__name__}: {e})"
                ) from e
        if got.shape != expected.shape or not torch.allclose(
            got, expected, atol=_TOLERANCE, rtol=_TOLERANCE, equal_nan=True
        ):
            diff = (
                f"max abs difference {(got - expected).abs().max().item():.3g}"
                if got.shape == expected.shape
                else f"output shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
            )
            raise ExportError(
                f"the {kind} export of {type(model).__name__} disagrees with the model on a batch of "
                f"{b} sets of size {n}{at} ({diff}): its output depends on the batch or set size in a way "
                "tracing cannot capture"
            )
