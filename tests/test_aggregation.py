"""SetAggregation: PyG-style (x, index) pooling equals the padded Set Transformer on every group."""

from __future__ import annotations

import pytest
import torch

from settransformer import ISAB, SAB, SetAggregation, ragged_forward
from settransformer.large.ragged import batch_to_offsets, ragged_to_padded


def _padded(aggr: SetAggregation, x: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """The reference: each group's rows (in their original order), padded, through the model."""
    order = index.argsort(stable=True)
    xp, mask = ragged_to_padded(x[order], batch_to_offsets(index[order], dim_size))
    return aggr.model(xp, mask)


@pytest.mark.parametrize("num_inducing", [None, 3])
def test_unsorted_index_and_empty_groups_equal_the_padded_path(num_inducing: int | None) -> None:
    torch.manual_seed(0)
    aggr = SetAggregation(8, num_seed_points=2, heads=2, layer_norm=True, num_inducing=num_inducing).eval()
    sizes = [5, 0, 17, 1, 0, 9]  # groups 1 and 4 empty, and 6, 7 beyond the largest index
    index = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    index = index[torch.randperm(len(index))]
    x = torch.randn(len(index), 8)
    out = aggr(x, index, dim_size=8)
    assert out.shape == (8, 16)
    ref = _padded(aggr, x, index, 8)
    torch.testing.assert_close(out, ref.flatten(1), atol=1e-5, rtol=1e-5)
    # rows of a group in another order: the same output (a set), and the group alone gives it too
    alone = aggr(x[index == 2], torch.zeros(17, dtype=torch.long))
    torch.testing.assert_close(alone[0], out[2], atol=1e-5, rtol=1e-5)
    # ptr, as for rows already grouped
    order = index.argsort(stable=True)
    torch.testing.assert_close(
        aggr(x[order], ptr=batch_to_offsets(index[order], 8)), out, atol=1e-5, rtol=1e-5
    )


def test_mean_of_seeds_and_gradients_flow() -> None:
    torch.manual_seed(1)
    aggr = SetAggregation(4, num_seed_points=3, concat=False)
    x = torch.randn(12, 4, requires_grad=True)
    index = torch.tensor([1, 0, 2, 1, 0, 0, 2, 2, 1, 0, 2, 1])
    out = aggr(x, index)
    assert out.shape == (3, 4)
    ref = _padded(aggr, x, index, 3).mean(1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_bad_arguments() -> None:
    aggr = SetAggregation(4)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="index"):
        aggr(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dim_size"):
        aggr(x, torch.tensor([0, 0, 1, 1, 3]), dim_size=2)
    with pytest.raises(ValueError, match=r"dim_size: expected a non-negative integer, got 2\.0"):
        aggr(x, torch.tensor([0, 0, 1, 1, 1]), dim_size=2.0)  # type: ignore[arg-type]
    assert ragged_forward is not None  # exported at the top level with SetAggregation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 8, "heads": 3}, "heads: must divide channels=8"),
        ({"channels": 0}, "channels: expected a positive integer"),
        ({"channels": 8, "num_seed_points": 0}, "num_seed_points: expected a positive integer"),
        ({"channels": 8, "num_encoder_blocks": -1}, "num_encoder_blocks: expected a non-negative integer"),
        ({"channels": 8, "num_decoder_blocks": -1}, "num_decoder_blocks: expected a non-negative integer"),
    ],
)
def test_construction_errors_use_pyg_argument_names(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetAggregation(**kwargs)


@pytest.mark.parametrize(
    "x, index, ptr, message",
    [
        (
            torch.randn(2, 5, 4),
            torch.zeros(5, dtype=torch.long),
            None,
            r"x: expected node features of shape \(total, 4\)",
        ),
        (torch.randn(5, 4), torch.zeros(5), None, "index: expected a 1-D integer tensor of group ids"),
        (
            torch.randn(5, 4),
            torch.tensor([0, 1, -1, 1, 0]),
            None,
            "index: expected non-negative group ids, got -1",
        ),
        (torch.randn(5, 4), None, torch.tensor([0, 3, 2, 5]), "ptr: expected non-decreasing offsets"),
        (torch.randn(5, 4), None, torch.tensor([0, 3, 6]), r"ptr: the last offset \(6\) must equal"),
        (torch.randn(0, 4), torch.zeros(0), None, "index: expected a 1-D integer tensor of group ids"),
    ],
)
def test_call_errors_use_pyg_argument_names(x, index, ptr, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetAggregation(4)(x, index, ptr=ptr)


def test_called_as_pyg_message_passing_calls_an_aggregation() -> None:
    """``aggr(x, index, ptr, dim_size, dim)`` positionally, PyG's conventions for no index and no rows."""
    torch.manual_seed(2)
    aggr = SetAggregation(4, num_seed_points=2, heads=2).eval()
    x = torch.randn(7, 4)
    index = torch.tensor([1, 0, 1, 1, 0, 2, 2])
    order = index.argsort(stable=True)
    out = aggr(x, index, None, 3, -2)
    torch.testing.assert_close(aggr(x[order], None, batch_to_offsets(index[order]), 3, 0), out)
    with pytest.raises(ValueError, match="dim: expected the rows' dimension"):
        aggr(x, index, dim=1)
    # no index: every row is group 0, and dim_size adds empty groups after it
    alone = aggr(x)
    torch.testing.assert_close(aggr(x, dim_size=3)[0], alone[0])
    assert aggr(x, dim_size=3).shape == (3, 8)
    torch.testing.assert_close(alone, aggr(x, torch.zeros(7, dtype=torch.long)))
    # no rows: no groups, or dim_size empty ones
    empty = torch.zeros(0, 4)
    assert aggr(empty).shape == (0, 8)
    assert aggr(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 8)
    assert aggr(empty, torch.zeros(0, dtype=torch.long), dim_size=2).shape == (2, 8)


def test_no_encoder_blocks_pool_the_rows_directly() -> None:
    torch.manual_seed(3)
    aggr = SetAggregation(4, num_seed_points=1, num_encoder_blocks=0, heads=2).eval()
    assert not any(isinstance(m, (SAB, ISAB)) for m in aggr.model.encoder.modules())
    x, index = torch.randn(9, 4), torch.tensor([0, 1, 1, 0, 2, 2, 2, 1, 0])
    out = aggr(x, index)
    torch.testing.assert_close(out, _padded(aggr, x, index, 3).flatten(1), atol=1e-5, rtol=1e-5)
    perm = torch.randperm(9)
    torch.testing.assert_close(aggr(x[perm], index[perm]), out, atol=1e-5, rtol=1e-5)


def test_inside_pyg_message_passing() -> None:
    """The adapter of the name-mapping guide: an ``Aggregation`` that PyG's ``MessagePassing`` accepts."""
    aggr_mod = pytest.importorskip("torch_geometric.nn.aggr")
    conv_mod = pytest.importorskip("torch_geometric.nn.conv")

    class SetAggr(aggr_mod.Aggregation):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()
            self.inner = SetAggregation(*args, **kwargs)

        def forward(self, x, index=None, ptr=None, dim_size=None, dim=-2):
            return self.inner(x, index, ptr, dim_size, dim)

    class Conv(conv_mod.MessagePassing):
        def __init__(self) -> None:
            super().__init__(aggr=SetAggr(4, heads=2, concat=False))

        def forward(self, x, edge_index):
            return self.propagate(edge_index, x=x)

    torch.manual_seed(4)
    conv = Conv().eval()
    x = torch.randn(5, 4)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 1, 0, 0, 0, 3]])  # node 2 and 4 receive nothing
    out = conv(x, edge_index)
    assert out.shape == (5, 4)
    inner = conv.aggr_module.inner
    torch.testing.assert_close(out[0], inner(x[[2, 3, 4]])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], inner(x[[0, 1]])[0], atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(out).all())
