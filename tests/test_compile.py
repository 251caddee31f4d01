"""torch.compile(model, dynamic=True): one graph for every batch and set size, no graph break.

The ``eager`` backend runs dynamo's tracing (where graph breaks and recompiles happen) without
code generation, so each case takes seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from settransformer import DeepSets, SetTransformer
from settransformer.compat import official_options

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

SIZES = [(3, 7), (5, 11), (2, 20)]  # (B, N): a new batch size and a new set size each call


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "isab": SetTransformer(2, 2, 3, dim_hidden=16, num_heads=2, num_inducing=4),
        "sab": SetTransformer(2, 2, 3, dim_hidden=16, num_heads=2, num_inducing=None),
        "official-layout": SetTransformer(
            2, 2, 3, dim_hidden=16, num_heads=2, num_inducing=4, **official_options(16)
        ),
        "deepsets": DeepSets(2, 2, 3, dim_hidden=16),
    }


def _graphs_and_breaks(model: nn.Module, masked: bool, grad: bool) -> tuple[int, dict[str, int]]:
    """Run the compiled ``model`` at every size of :data:`SIZES`; check its output against eager."""
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    gen = torch.Generator().manual_seed(1)
    for b, n in SIZES:
        x = torch.randn(b, n, 2, generator=gen)
        mask = torch.rand(b, n, generator=gen) > 0.3 if masked else None
        with torch.set_grad_enabled(grad):
            got, want = compiled(x, mask), model(x, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if grad:
            got.sum().backward()
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", ["isab", "sab", "official-layout", "deepsets"])
def test_compiles_once_without_graph_breaks(name: str, masked: bool) -> None:
    model = _models()[name].eval()
    graphs, breaks = _graphs_and_breaks(model, masked, grad=False)
    assert breaks == {}
    assert graphs == 1  # no recompile for a new batch size or set size


def test_training_forward_compiles_once() -> None:
    model = _models()["isab"].train()
    graphs, breaks = _graphs_and_breaks(model, masked=True, grad=True)
    assert breaks == {}
    assert graphs == 1
