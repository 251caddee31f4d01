"""Ahead-of-time and JIT compilation of a SetTransformer.

- ``torch.export.export`` with a dynamic batch size and set size (``torch.export.Dim``), with and
  without a mask: the exported program must agree with eager mode at set sizes it was not traced at.
- ``torch.compile(model, dynamic=True)`` at two set sizes: opt-in (``SETTRANSFORMER_TEST_COMPILE=1``),
  since compiling took 38-45 s wall (10-13 s CPU) alone and 130 s inside the suite on the loaded
  2-core development machine, most of it Inductor generating and compiling C++.
- ``torch.jit.trace`` works (with tracer warnings); ``torch.jit.script`` does not support the
  models (``Unknown type annotation: 'dict[str, Any]'``), so it is not tested.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.export import Dim, ExportedProgram, export

from settransformer.nn.models import SetTransformer

DIM_INPUT = 3
SIZES = [(1, 1), (2, 5), (4, 37), (3, 130)]  # (batch, set size), none of them the traced (3, 10)


def tiny(**options: object) -> SetTransformer:
    options = {"dim_hidden": 16, "num_heads": 4, "num_inducing": 4, **options}
    return SetTransformer(DIM_INPUT, 2, 4, **options).eval()  # type: ignore[arg-type]


def inputs(b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.rand(b, n) > 0.3
    mask[0, 0] = True
    if b > 2:
        mask[-1] = False  # an empty set
    return torch.randn(b, n, DIM_INPUT), mask


def export_model(model: SetTransformer, with_mask: bool) -> ExportedProgram:
    batch, size = Dim("batch", min=1, max=1024), Dim("set", min=1, max=1 << 16)
    x, mask = inputs(3, 10)
    if with_mask:
        return export(
            model, (x, mask), dynamic_shapes={"x": {0: batch, 1: size}, "mask": {0: batch, 1: size}}
        )
    return export(model, (x,), dynamic_shapes={"x": {0: batch, 1: size}})


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_export_with_dynamic_batch_and_set_size(with_mask: bool) -> None:
    model = tiny()
    program = export_model(model, with_mask).module()
    for b, n in SIZES:
        x, mask = inputs(b, n)
        args = (x, mask) if with_mask else (x,)
        with torch.no_grad():
            torch.testing.assert_close(program(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_exported_sab_model_with_pre_norm() -> None:
    """The other encoder (SABs) and pre-norm export too."""
    model = tiny(num_inducing=None, norm="pre")
    program = export_model(model, with_mask=True).module()
    for b, n in SIZES[1:3]:
        x, mask = inputs(b, n)
        with torch.no_grad():
            torch.testing.assert_close(program(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SETTRANSFORMER_TEST_COMPILE"), reason="opt-in: set SETTRANSFORMER_TEST_COMPILE=1"
)
def test_torch_compile_dynamic() -> None:
    model = tiny()
    compiled = torch.compile(model, dynamic=True)
    for b, n in [(2, 7), (3, 23)]:
        x, mask = inputs(b, n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def test_jit_trace() -> None:
    """A traced model (traced with a mask) agrees with eager mode at other batch and set sizes."""
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values and the deprecation notice
        traced = torch.jit.trace(model, inputs(3, 10))
    for b, n in SIZES[1:]:
        x, mask = inputs(b, n)
        with torch.no_grad():
            torch.testing.assert_close(traced(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
