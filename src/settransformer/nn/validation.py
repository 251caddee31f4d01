"""Input checks shared by every block and model.

Each check raises ``TypeError`` for the wrong kind of object or dtype and ``ValueError`` for the
wrong shape, device or values, with a message that names the argument and what was expected, so a
user sees ``x: expected a floating-point tensor of shape (B, N, 3), got shape (10, 3)`` rather than
an error from deep inside a matrix product.

What every public block and model checks on each call (see
[`prepare_set`][settransformer.nn.validation.prepare_set]):

- the set: a floating-point tensor ``(B, N, D)`` with the block's ``D``; ``B = 0`` and ``N = 0`` are
  allowed (an empty set's attention output is zero, see
  [`settransformer.nn.attention`][settransformer.nn.attention]);
- the mask: ``None`` or a *bool* tensor ``(B, N)``, True for real elements, on the set's device.
  Integer and float 0/1 masks are rejected rather than converted: PyTorch's own float attention
  masks are additive (0 = keep) and ``nn.MultiheadAttention``'s boolean ``key_padding_mask`` marks
  *padding*, so guessing could silently invert a mask;
- the set against the module: the parameters' device, and their dtype (unless autocast is on);
- finiteness of the *real* elements: NaN or inf there would turn every output of the set into NaN.
  Padded elements may hold anything (NaN included): they are zero-filled before use.

The finiteness check reads the whole input (one ``sum`` over it, the exact element-wise test only
when that sum is not finite), and on a GPU it synchronises with the device once per forward. A
block's input that another block has just returned, untouched since (the same tensor at the same
version counter, see [`block_output`][settransformer.nn.validation.block_output]), is not read again: it came
from checked input through the blocks' own arithmetic, like every tensor inside a model, so blocks chained by
hand pay for one check, as a model does. It is on by default and can be switched off process-wide for speed::

    settransformer.nn.validation.set_finite_checks(False)        # from now on
    with settransformer.nn.validation.finite_checks(False): ...  # inside the block only
    SETTRANSFORMER_CHECK_FINITE=0                             # environment, read at import

It is skipped automatically while tracing, scripting, compiling or exporting (``torch.jit``,
``torch.compile``, ``torch.export``, ONNX export), where values are not known. All other checks
are O(1) Python and always on.
"""

from __future__ import annotations

import math
import numbers
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "block_output",
    "check_finite",
    "check_like",
    "check_mask",
    "check_positive",
    "check_probability",
    "check_scale",
    "check_set",
    "check_top_k",
    "finite_checks",
    "finite_checks_enabled",
    "func_transformed",
    "prepare_set",
    "set_finite_checks",
    "tracing",
    "zero_padding",
]

# Default from the environment, so a deployment can switch the O(N) check off without code changes.
_finite_checks = os.environ.get("SETTRANSFORMER_CHECK_FINITE", "1").strip().lower() not in ("0", "false")


def finite_checks_enabled() -> bool:
    """Whether blocks and models check that the real elements of their inputs are finite.

    Examples:
        >>> with finite_checks(False):
        ...     finite_checks_enabled()
        False
    """
    return _finite_checks


def set_finite_checks(enabled: bool) -> None:
    """Turn the finiteness check of inputs on or off for the whole process.

    Examples:
        >>> previous = finite_checks_enabled()
        >>> set_finite_checks(False)
        >>> check_finite(torch.tensor([[[float("nan")]]])).shape  # not checked
        torch.Size([1, 1, 1])
        >>> set_finite_checks(previous)
    """
    global _finite_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected True or False, got {enabled!r}")
    _finite_checks = enabled


@contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Context manager: the finiteness check on (or off) inside the ``with`` block only.

    Examples:
        >>> with finite_checks(True):  # doctest: +ELLIPSIS
        ...     check_finite(torch.tensor([[[1.0], [float("inf")]]]))
        Traceback (most recent call last):
        ...
        ValueError: x: expected finite values in every real (unmasked) element, ... the first at x[0, 1] ...
    """
    previous = _finite_checks
    set_finite_checks(enabled)
    try:
        yield
    finally:
        set_finite_checks(previous)


def tracing() -> bool:
    """True while torch traces, scripts, compiles or exports: tensor values are unknown then, and
    a graph should hold one computation for every size.

    Covers ONNX export too: the TorchScript exporter traces, the dynamo exporter uses torch.export.

    Examples:
        >>> tracing()
        False
    """
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


_block_outputs: dict[int, tuple[weakref.ref[Tensor], int]] = {}
"""Tensors returned by the blocks' public forwards: ``id -> (weak reference, version counter)``. A
few dozen at most: a chain of blocks needs only the last one, and ids of freed tensors are reused."""
_MAX_BLOCK_OUTPUTS = 64


def block_output(y: Tensor) -> Tensor:
    """Record ``y`` as a block's output and return it: while it is not modified in place, a block
    that gets it as input does not check its values again
    ([`check_finite`][settransformer.nn.validation.check_finite]).

    Not recorded while the finiteness check is off, while tracing, or for inference-mode tensors
    (they carry no version counter, so an in-place change could not be seen). Writes that bypass the
    version counter (through ``y.data``, or a NumPy view from ``y.numpy()``) are not seen either: after
    such a write, pass ``y.clone()``.

    Examples:
        >>> y = block_output(torch.full((1, 2, 3), float("nan")))  # say, from diverged weights
        >>> check_finite(y).shape  # not read again
        torch.Size([1, 2, 3])
        >>> check_finite(y.mul_(2))  # modified in place: read  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: x: expected finite values in every real (unmasked) element, ...
    """
    if _finite_checks and not tracing() and not y.is_inference():
        if len(_block_outputs) >= _MAX_BLOCK_OUTPUTS:
            _block_outputs.clear()
        _block_outputs[id(y)] = (weakref.ref(y), y._version)
    return y


def _is_block_output(x: Tensor) -> bool:
    """Whether ``x`` is a recorded block output ([`block_output`][settransformer.nn.validation.block_output]),
    unmodified since."""
    if tracing() or not _block_outputs:  # a compiled graph must not depend on the record
        return False
    seen = _block_outputs.get(id(x))
    return seen is not None and seen[0]() is x and seen[1] == x._version


def check_set(x: object, dim: int, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating-point set batch ``(B, N, dim)`` and return it.

    Examples:
        >>> check_set(torch.zeros(2, 5, 3), 3).shape
        torch.Size([2, 5, 3])
        >>> check_set(torch.zeros(5, 3), 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: x: expected a floating-point tensor of shape (B, N, 3), got shape (5, 3) (add a batch ...
    """
    expected = f"a floating-point tensor of shape (B, N, {dim})"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected {expected}, got dtype {x.dtype} (convert with {name}.float())")
    if x.dim() != 3:
        hint = f" (add a batch dimension with {name}.unsqueeze(0))" if x.dim() == 2 else ""
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}{hint}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}")
    return x


def check_mask(mask: object, x: Tensor, name: str = "mask") -> Tensor | None:
    """Check that ``mask`` is ``None`` or a boolean ``(B, N)`` tensor matching ``x: (B, N, D)``.

    Only ``torch.bool`` is accepted (True = real element); see the module docstring for why 0/1
    integer or float masks are not converted.

    Examples:
        >>> x = torch.zeros(2, 3, 4)
        >>> check_mask(torch.ones(2, 3, dtype=torch.bool), x).shape
        torch.Size([2, 3])
        >>> check_mask(torch.ones(2, 3), x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: mask: expected a bool tensor of shape (B, N) = (2, 3), ..., got dtype torch.float32 ...
    """
    if mask is None:
        return None
    b, n = x.shape[0], x.shape[1]

    def expected() -> str:  # formatted only on failure: formatting a symbolic size specialises it
        return f"a bool tensor of shape (B, N) = ({b}, {n}), True for real elements"

    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected {expected()}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name}: expected {expected()}, got dtype {mask.dtype} "
            f"(if 1 marks real elements, pass {name}.bool())"
        )
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{name}: expected {expected()}, got shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name}: is on {mask.device} but the set is on {x.device}")
    return mask


def check_like(x: Tensor, like: Tensor, name: str = "x") -> Tensor:
    """Check that ``x`` is on the device of the module parameter ``like``, with its dtype.

    The dtype is not compared while autocast is enabled for ``x``'s device (mixed precision
    legitimately feeds float32 parameters with float16/bfloat16 activations and back).

    Examples:
        >>> like = torch.nn.Linear(3, 2).weight
        >>> check_like(torch.zeros(1, 4, 3), like).dtype
        torch.float32
        >>> check_like(torch.zeros(1, 4, 3, dtype=torch.float64), like)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: x: expected dtype torch.float32 like the module's parameters, got torch.float64 ...
    """
    if x.device != like.device:
        raise ValueError(
            f"{name}: is on {x.device} but the module's parameters are on {like.device} "
            f"(move one of them with .to())"
        )
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: expected dtype {like.dtype} like the module's parameters, got {x.dtype} "
            f"(convert the input with {name}.to({like.dtype}) or the module with .to({x.dtype}))"
        )
    return x


def check_finite(x: Tensor, name: str = "x") -> Tensor:
    """Check that every value of ``x`` is finite (``x`` zero at padded rows, so only real ones count).

    A no-op when switched off ([`set_finite_checks`][settransformer.nn.validation.set_finite_checks]), while
    tracing or compiling, inside ``torch.func`` transforms (``vmap``, ``grad``: per-sample values cannot be
    read), on the meta device, and for another block's untouched output
    ([`block_output`][settransformer.nn.validation.block_output]). One ``sum`` decides in the common case (any
    NaN or inf makes the sum non-finite); only a non-finite sum, which a large finite input can also overflow
    to, pays for the exact test.

    Examples:
        >>> with finite_checks(True):
        ...     check_finite(torch.ones(2, 3, 4)).shape
        torch.Size([2, 3, 4])
    """
    if (
        not _finite_checks
        or tracing()
        or x.numel() == 0
        or x.device.type == "meta"
        or func_transformed(x)
        or _is_block_output(x)
    ):
        return x
    x0 = x.detach()
    if math.isfinite(x0.sum().item()):  # .item() and math: a third of the cost of bool(isfinite(...))
        return x
    bad = ~torch.isfinite(x0)
    if not bool(bad.any()):
        return x
    where = [int(i) for i in bad.nonzero()[0]]
    index = ", ".join(map(str, where[:-1] if x.dim() > 1 else where))
    raise ValueError(
        f"{name}: expected finite values in every real (unmasked) element, got NaN or inf in "
        f"{int(bad.any(dim=-1).sum())} element(s), the first at {name}[{index}] "
        f"(padded elements may hold anything; switch this check off with "
        f"settransformer.nn.validation.set_finite_checks(False))"
    )


def func_transformed(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` transform's wrapper (``vmap``'s batched tensor, ``grad``'s).

    Its values cannot be read with ``.item()``, and ``vmap`` has no rule for the ``out=`` variants
    of the inference paths, so the blocks take their plain path for it.

    Examples:
        >>> x = torch.zeros(2, 3)
        >>> func_transformed(x), torch.func.vmap(lambda row: torch.tensor(func_transformed(row)))(x).tolist()
        (False, [True, True])
    """
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Set padded rows of ``x: (B, N, D)`` to zero (``mask: (B, N)``, True = real).

    ``masked_fill`` rather than a multiplication, so padded values that are NaN or infinite
    cannot leak (``0 * nan`` is NaN) and padded positions receive exactly zero gradient.

    Examples:
        >>> x = torch.tensor([[[1.0], [float("nan")]]])
        >>> zero_padding(x, torch.tensor([[True, False]]))
        tensor([[[1.],
                 [0.]]])
    """
    if mask is None:
        return x
    return x.masked_fill(~mask[..., None], 0.0)


def prepare_set(
    x: object,
    mask: object,
    dim: int,
    like: Tensor | None = None,
    *,
    name: str = "x",
    mask_name: str = "mask",
) -> tuple[Tensor, Tensor | None]:
    """Every check of a block's or model's set input, then zero padding.

    Args:
        x: the set batch, expected ``(B, N, dim)`` floating point.
        mask: ``None`` or bool ``(B, N)``, True for real elements.
        dim: the expected feature size.
        like: a parameter of the module: ``x`` must share its device and (outside autocast) dtype.
        name: the argument's name for the messages.
        mask_name: the mask's name for the messages.

    Returns:
        x: ``(B, N, dim)``, zero at padded rows (checked finite, unless switched off).
        mask: the mask, unchanged.

    Examples:
        >>> x, mask = torch.tensor([[[1.0], [float("nan")]]]), torch.tensor([[True, False]])
        >>> prepare_set(x, mask, 1)[0]
        tensor([[[1.],
                 [0.]]])
    """
    xt = check_set(x, dim, name)
    m = check_mask(mask, xt, mask_name)
    if like is not None:
        check_like(xt, like, name)
    if _is_block_output(xt):  # checked upstream; zero padding makes a new tensor, so decide here
        return zero_padding(xt, m), m
    return check_finite(zero_padding(xt, m), name), m


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check a size argument (an ``int``, positive or, with ``allow_zero``, non-negative).

    Examples:
        >>> check_positive("chunk_size", 0)
        Traceback (most recent call last):
        ...
        ValueError: chunk_size: expected a positive integer, got 0
    """
    lowest = 0 if allow_zero else 1
    # numbers.Integral takes NumPy's integers too (a size read from an array's shape or a file)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {kind} integer, got {value!r}")
    return int(value)


def check_probability(name: str, value: object) -> float:
    """Check a dropout probability in ``[0, 1)``.

    Examples:
        >>> check_probability("dropout", 0.1)
        0.1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def check_top_k(value: object, name: str = "top_k") -> int | None:
    """Check a hard-attention ``top_k``: a positive integer, or ``None`` for soft attention.

    Examples:
        >>> check_top_k(3), check_top_k(None)
        (3, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
    return int(value)


def check_scale(value: object, name: str = "scale") -> float | None:
    """Check a softmax temperature: a positive finite number, or ``None`` for the default.

    Examples:
        >>> check_scale(0.25), check_scale(None)
        (0.25, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive number or None, got {value!r}")
    return value
