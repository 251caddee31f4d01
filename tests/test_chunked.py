"""``settransformer.nn.streaming``: chunk-by-chunk evaluation equals the unchunked blocks and models.

Outputs for random sizes, masks (empty sets included), chunk sizes that do not divide N (and 1),
every ``norm`` and pooling; inputs as NumPy arrays, memmaps and h5py datasets; float64 gradients
through the checkpointed path; the memory bound itself (largest activation in inference, tensors
kept for backward in training); and the errors.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from settransformer import ISAB, PMA, DeepSets, SetTransformer
from settransformer.nn import blocks, streaming
from settransformer.nn.rows import InducedRows
from settransformer.nn.streaming import (
    encode_chunked,
    encode_pool_chunked,
    induce_chunked,
    isab_chunked,
    iter_encode_chunked,
    pma_chunked,
)

DIM, HEADS, M = 16, 4, 5
NORMS = ["post", "pre", None]
SIZES = [57, 0, 23]  # a batch of sets of different sizes, one empty


def model_of(**opt: Any) -> SetTransformer:
    opt = {"dim_hidden": DIM, "num_heads": HEADS, "num_inducing": M, **opt}
    return SetTransformer(3, num_outputs=2, dim_output=4, **opt).eval()


def assert_close(a: Tensor, b: Tensor, atol: float = 2e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol), f"max difference {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("norm", NORMS)
def test_set_transformer_matches_unchunked(norm: str | None, chunk_size: int, padded) -> None:
    model = model_of(norm=norm, num_encoder_layers=3)
    x, mask, _ = padded(SIZES, 3)
    with torch.no_grad():
        assert_close(model(x, mask, chunk_size=chunk_size), model(x, mask))
        assert_close(model(x[:1], chunk_size=chunk_size), model(x[:1]))  # no mask


@pytest.mark.parametrize(
    "opt",
    [
        {"pooling": "mean"},
        {"pooling": "max"},
        {"pooling": "sum", "norm": "pre"},
        {"encoder": "rff"},
        {"ff_dim": 24, "residual": "projected", "out_proj": False},
        {"scale": 0.7, "num_decoder_layers": 0},
        {"num_inducing": 40},  # more inducing points than the chunk has elements
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_model_options(opt: dict[str, Any], padded) -> None:
    model = model_of(**opt)
    x, mask, _ = padded(SIZES, 3)
    with torch.no_grad():
        assert_close(encode_pool_chunked(model, x, mask, chunk_size=9), model(x, mask))


def test_deepsets(padded) -> None:
    model = DeepSets(3, 2, 4, dim_hidden=DIM, pool="max").eval()
    x, mask, _ = padded(SIZES, 3)
    with torch.no_grad():
        assert_close(model(x, mask, chunk_size=10), model(x, mask))


@pytest.mark.parametrize("norm", NORMS)
def test_blocks(norm: str | None, padded) -> None:
    isab, pma = ISAB(3, DIM, HEADS, M, norm=norm).eval(), PMA(DIM, HEADS, 3, norm=norm).eval()
    x, mask, _ = padded(SIZES, 3)
    z, zmask, _ = padded(SIZES, DIM)
    with torch.no_grad():
        assert_close(isab_chunked(isab, x, mask, chunk_size=8), isab(x, mask))
        assert_close(
            induce_chunked(isab, x, mask, chunk_size=8), isab.induce(x.masked_fill(~mask[..., None], 0), mask)
        )
        assert_close(pma_chunked(pma, z, zmask, chunk_size=6), pma(z, zmask))


@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_a_chunk_of_padding_leaves_far_scores_alone(offset: float) -> None:
    """A chunk that is all padding for one set must not rescale that set's statistics: scores far
    below zero (inputs far from the origin) underflowed with a reference of 0 for such a chunk."""
    torch.manual_seed(0)
    pma = PMA(4, num_heads=1, num_seeds=1).eval()
    model = SetTransformer(3, 1, 2, dim_hidden=16, num_heads=2, num_inducing=4, norm=None).eval()
    z, x = torch.randn(2, 8, 4) + offset, torch.randn(2, 64, 3) + offset
    zmask, xmask = torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 64, dtype=torch.bool)
    zmask[1, 4:], xmask[1, 32:] = False, False  # the second set's last chunk is padding
    with torch.no_grad():
        assert_close(pma(z, zmask, chunk_size=4), pma(z, zmask))
        full = model(x, xmask)
        assert_close(model(x, xmask, chunk_size=32), full, atol=3e-6 * full.abs().max().item())


@pytest.mark.parametrize(("form", "out_proj"), [("induced", True), ("standard", True), ("standard", False)])
@pytest.mark.parametrize("ff_dim", [None, 24])
@pytest.mark.parametrize("residual", ["auto", "projected"])
@pytest.mark.parametrize("norm", NORMS)
def test_induced_rows_fast_path(
    norm: str | None, residual: str, ff_dim: int | None, form: str, out_proj: bool
) -> None:
    # every step of the block writes into a reused buffer: each layout, and two calls of
    # different sizes (the second must not read what the first left)
    isab = ISAB(DIM, DIM, HEADS, 2, norm=norm, residual=residual, ff_dim=ff_dim, out_proj=out_proj).eval()
    x = torch.randn(2, 30, DIM)
    with torch.no_grad():
        h = isab.induce(x, None)
        rows = InducedRows(isab.mab1, h, form=form)  # type: ignore[arg-type]
        assert rows.fast and rows.folded == (form == "induced")
        first = rows(x[:, :13]).clone()
        assert_close(rows(x[:, 13:]), isab.mab1.forward_unchecked(x[:, 13:], h, None))
        assert_close(first, isab.mab1.forward_unchecked(x[:, :13], h, None))
        # into a caller's tensor: a contiguous one also serves as a step's buffer, a strided one not
        expected = isab.mab1.forward_unchecked(x, h, None)
        out = torch.full((2, 30, DIM), float("nan"))
        assert rows(x[:1], slice(0, 1), out=out[:1]) is not None
        assert_close(out[:1], expected[:1])
        assert rows(x[:, 20:], out=out[:, 20:]).data_ptr() == out[:, 20:].data_ptr()
        assert_close(out[:, 20:], expected[:, 20:])
        assert_close(rows(x[1:, :20], slice(1, 2)), expected[1:, :20])  # no longer lent: kept buffers


@pytest.mark.parametrize("num_inducing", [2, M, 32])
def test_induced_rows_take_the_folded_form_only_where_it_is_cheaper(num_inducing: int) -> None:
    isab = ISAB(DIM, DIM, HEADS, num_inducing, residual="projected").eval()
    x = torch.randn(2, 40, DIM)
    with torch.no_grad():
        h = isab.induce(x, None)
        rows = InducedRows(isab.mab1, h)
        assert rows.fast
        assert rows.folded == (isab.mab1.choose_form(40, num_inducing) == "induced") == (num_inducing == 2)
        expected = isab.mab1.forward_unchecked(x, h, None)
        assert_close(rows(x), expected)
        out = torch.empty(2, 40, DIM)  # smaller than the scores where num_inducing * HEADS > DIM
        assert rows(x, out=out) is out
        assert_close(out, expected)


@pytest.mark.parametrize("norm", NORMS)
def test_induced_rows_without_output_projection(norm: str | None) -> None:
    # the official layout: projected residual, no W^O -- per-head products on the fast path
    isab = ISAB(DIM, DIM, HEADS, M, norm=norm, residual="projected", out_proj=False).eval()
    x = torch.randn(3, 30, DIM)
    with torch.no_grad():
        h = isab.induce(x, None)
        rows = InducedRows(isab.mab1, h)
        assert rows.fast and not rows.folded
        assert_close(rows(x[:, :13]), isab.mab1.forward_unchecked(x[:, :13], h, None))
        assert_close(rows(x[1:3], slice(1, 3)), isab.mab1.forward_unchecked(x[1:3], h[1:3], None))


@pytest.mark.parametrize("out_proj", [True, False])
@pytest.mark.parametrize(("b", "n"), [(64, 40), (1, 3000), (3000, 1)])
def test_isab_row_and_set_blocks_match_autograd_path(b: int, n: int, out_proj: bool, monkeypatch) -> None:
    # without autograd an ISAB runs mab1 over row blocks (few large sets) or set blocks (many
    # small ones; here at any batch size); with autograd, over the whole batch at once
    monkeypatch.setattr(blocks, "MIN_SET_BLOCK_ELEMENTS", 0)
    isab = ISAB(3, DIM, HEADS, M, out_proj=out_proj).eval()
    calls = []
    call = InducedRows.__call__
    monkeypatch.setattr(InducedRows, "__call__", lambda self, *a, **k: calls.append(a) or call(self, *a, **k))
    x = torch.randn(b, n, 3)
    mask = torch.rand(b, n) > 0.3
    with torch.no_grad():
        blocked = isab(x, mask)
    assert len(calls) == 2  # two blocks of rows or of sets
    assert_close(blocked, isab(x, mask).detach())


def test_per_element_outputs(padded) -> None:
    model = model_of()
    x, mask, _ = padded(SIZES, 3)
    with torch.no_grad():
        expected = model.encode(x.masked_fill(~mask[..., None], 0), mask)
        assert_close(encode_chunked(model, x, mask, chunk_size=10), expected)
        chunks = list(iter_encode_chunked(model, x, mask, chunk_size=25))
        assert [start for start, _ in chunks] == [0, 25, 50]
        assert_close(torch.cat([z for _, z in chunks], dim=1), expected)


def test_one_set_from_numpy_and_memmap(tmp_path) -> None:
    model = model_of()
    data = np.random.default_rng(0).normal(size=(203, 3))  # float64: converted per chunk
    path = tmp_path / "set.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    readonly = np.memmap(path, dtype=np.float32, mode="r", shape=data.shape)
    with torch.no_grad():
        expected = model(torch.from_numpy(data).float()[None])[0]
        assert_close(encode_pool_chunked(model, data, chunk_size=50), expected)
        assert_close(model(readonly, chunk_size=64), expected)  # no batch dimension in, none out
        out = np.lib.format.open_memmap(tmp_path / "z.npy", mode="w+", dtype=np.float32, shape=(203, DIM))
        encode_chunked(model, readonly, chunk_size=64, out=out)
        assert_close(torch.from_numpy(np.asarray(out)), model.encode(torch.from_numpy(data).float()[None])[0])


def test_h5py_dataset(tmp_path, padded) -> None:
    h5py = pytest.importorskip("h5py")
    model = model_of()
    x, mask, _ = padded(SIZES, 3)
    with h5py.File(tmp_path / "sets.h5", "w") as f:
        dset = f.create_dataset("x", data=x.numpy())
        out = f.create_dataset("z", shape=(3, max(SIZES), DIM), dtype="f4")
        with torch.no_grad():
            assert_close(encode_pool_chunked(model, dset, mask.numpy(), chunk_size=16), model(x, mask))
            encode_chunked(model, dset, mask, chunk_size=16, out=out)
            expected = model.encode(x.masked_fill(~mask[..., None], 0), mask)
            assert_close(torch.from_numpy(out[...]), expected)


def _grads(model: torch.nn.Module, x: Tensor, mask: Tensor, **kw: Any) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = model(x, mask, **kw)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [p.grad for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("norm", NORMS)
def test_gradients_match_unchunked(norm: str | None, padded) -> None:
    model = model_of(norm=norm).double().train()  # train mode, no dropout: deterministic
    x, mask, _ = padded([30, 0, 17], 3, dtype=torch.float64)
    for expected, got in zip(_grads(model, x, mask), _grads(model, x, mask, chunk_size=7), strict=True):
        assert expected is not None and got is not None
        assert torch.allclose(expected, got, atol=1e-10), (expected - got).abs().max()


def test_isab_gradients_per_element(padded) -> None:
    isab = ISAB(3, DIM, HEADS, M).double()
    x, mask, _ = padded([20, 11], 3, dtype=torch.float64)
    w = torch.randn(2, 20, DIM, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (isab(xa, mask) * w).sum().backward()
    (isab_chunked(isab, xb, mask, chunk_size=6) * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-10)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, Tensor) and not func._schema.is_mutable and t._base is None:
                self.largest = max(self.largest, t.numel())
        return out


def test_inference_activations_bounded_by_chunk() -> None:
    model = model_of(num_inducing=8)  # heads * m = 32 = 2 * width
    n, chunk = 5000, 64
    x = torch.randn(1, n, 3)
    with torch.inference_mode():
        with _LargestOutput() as unchunked:
            model(x)
        with _LargestOutput() as chunked:
            model(x, chunk_size=chunk)
    assert unchunked.largest >= n * DIM  # the check can see a full-set activation
    assert chunked.largest <= chunk * max(DIM, HEADS * 8)


def test_backward_keeps_no_per_element_activations() -> None:
    model = model_of()
    n = 4000
    x = torch.randn(1, n, 3)
    storages: dict[int, int] = {}  # saved storages other than the input's (chunks are views of it)

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() != x.untyped_storage().data_ptr():
            storages[s.data_ptr()] = s.nbytes() // t.element_size()
        return t

    for chunk_size in (None, 100):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, chunk_size=chunk_size)
        out.sum().backward()
        total = sum(storages.values())
        if chunk_size is None:
            assert total > 5 * n * DIM
        else:  # chunks' activations are recomputed in backward; only small per-chunk factors remain
            assert total < n * DIM / 4, total


def test_dropout_in_training_runs_and_backpropagates() -> None:
    model = model_of(dropout=0.3).train()
    x = torch.randn(2, 50, 3)
    out = model(x, chunk_size=16)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dropout_draws_the_same_numbers_for_a_chunk_in_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 2 builds the second ISAB's summary from the first ISAB's rows, pass 3 recomputes those
    rows to attend to it: in training they must be the same rows, dropout included (they were
    drawn afresh in each pass)."""
    model = model_of(dropout=0.3).train()
    x = torch.randn(2, 50, 3)
    seen: dict[bytes, list[Tensor]] = {}
    rows = streaming._rows

    def recording(fns: Any, xc: Tensor, mask: Tensor | None) -> Tensor:
        if not fns:  # pass 1: the raw chunk
            return xc
        first = streaming.zero_padding(fns[0](xc), mask)
        seen.setdefault(xc.numpy().tobytes(), []).append(first.detach().clone())
        return rows(fns[1:], first, mask)

    monkeypatch.setattr(streaming, "_rows", recording)
    with torch.no_grad():
        model(x, chunk_size=16)
    assert len(seen) == 4  # chunks of 16, 16, 16 and 2 rows
    for outputs in seen.values():
        assert len(outputs) >= 2 and all(torch.equal(o, outputs[0]) for o in outputs[1:])


def test_errors() -> None:
    model = model_of()
    x = torch.randn(1, 10, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        model(x, chunk_size=0)
    with pytest.raises(ValueError, match=r"x: expected .*\(B, N, 3\)"):
        model(torch.randn(1, 10, 4), chunk_size=4)
    with pytest.raises(TypeError, match="x: expected"):
        encode_pool_chunked(model, [[1.0, 2.0, 3.0]], chunk_size=4)
    with pytest.raises(TypeError, match="dtype"):
        encode_pool_chunked(model, np.zeros((5, 3), dtype=np.int64), chunk_size=4)
    with pytest.raises(ValueError, match="mask: expected shape"):
        model(x, torch.ones(1, 9, dtype=torch.bool), chunk_size=4)
    with pytest.raises(ValueError, match="SAB"):
        model_of(num_inducing=None)(x, chunk_size=4)
    with pytest.raises(ValueError, match="out: expected"), torch.no_grad():
        encode_chunked(model, x, chunk_size=4, out=torch.empty(1, 10, DIM + 1))
    with pytest.raises(ValueError, match=r"encoder\[0\]\.mab0: chunked evaluation supports only"):
        model_of(score="gaussian")(x, chunk_size=4)
    model.encoder[1].mab0.top_k = 2  # hard attention does not decompose into chunks
    with pytest.raises(ValueError, match=r"encoder\[1\]\.mab0: chunked evaluation supports only"):
        model(x, chunk_size=4)


def test_isab_and_pma_forward_take_chunk_size() -> None:
    torch.manual_seed(0)
    isab, pma = ISAB(3, 8, 2, 4).eval(), PMA(8, 2, 3).eval()
    x = torch.randn(2, 37, 3)
    mask = torch.arange(37)[None] < torch.tensor([[37], [11]])
    with torch.no_grad():
        z = isab(x, mask)
        torch.testing.assert_close(isab(x, mask, chunk_size=5), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pma(z, mask, chunk_size=5), pma(z, mask), atol=1e-5, rtol=1e-5)
        assert isab(x.numpy(), mask.numpy(), chunk_size=8).shape == (2, 37, 8)  # any sliceable array
    with pytest.raises(ValueError, match="chunk_size"):
        isab(x, chunk_size=0)


@pytest.mark.parametrize("width", [1, 8])
def test_an_empty_batch_goes_through_the_chunked_path(width: int) -> None:
    """``B = 0`` (found by the fuzz run): the induced rows must not reshape with ``-1``."""
    model = SetTransformer(1, 1, 1, dim_hidden=width, num_heads=1, num_inducing=1, num_decoder_layers=0)
    model.eval()
    x = torch.zeros(0, 3, 1)
    with torch.no_grad():
        out = model(x, chunk_size=1)
    assert out.shape == (0, 1, 1)
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_chunked_under_bfloat16_autocast(norm: str) -> None:
    """Chunked evaluation runs under CPU bfloat16 autocast and stays near float32.

    Two fast paths used ops that autocast does not cover (the fused kernel that returns the
    log-sum-exp, and ``out=`` products) and failed with a dtype error; they now cast as autocast
    would or step aside. Tolerance as in ``test_models.test_bfloat16_autocast``: relative error
    (Frobenius norm) 5e-2.
    """
    torch.manual_seed(0)
    model = SetTransformer(3, 2, 4, dim_hidden=32, num_inducing=8, norm=norm).eval()
    x = torch.randn(2, 300, 3)
    mask = torch.arange(300)[None] < torch.tensor([[300], [170]])
    with torch.no_grad():
        expected = model(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, mask, chunk_size=64)
            rows = isab_chunked(model.encoder[0], x, mask, chunk_size=64)
        plain_rows = model.encoder[0](x, mask)
    assert torch.isfinite(out).all() and torch.isfinite(rows).all()
    assert float((out.float() - expected).norm() / expected.norm()) < 5e-2
    assert float((rows.float() - plain_rows).norm() / plain_rows.norm()) < 5e-2


@pytest.mark.parametrize("chunk_size", [8192, 100_000])
def test_chunked_float16_with_autograd_accumulates_in_float32(chunk_size: int) -> None:
    """Over 65,504 elements a float16 softmax denominator overflows: the running statistics of the
    chunks, and the sums inside one chunk of more elements than that, are float32 (the output, NaN
    before, matches float64)."""
    torch.manual_seed(0)
    pma = PMA(16, 4, 1).eval()
    exact = PMA(16, 4, 1).eval().double()
    exact.load_state_dict(pma.state_dict())
    x = 1 + 0.1 * torch.randn(1, 70_000, 16)
    with torch.no_grad():
        reference = exact(x.double())
    out = pma.half()(x.half().requires_grad_(True), chunk_size=chunk_size)
    assert out.dtype == torch.float16
    assert float((out.double() - reference).abs().max() / reference.abs().max()) < 5e-3


def test_chunked_inputs_of_any_memory_layout() -> None:
    """A transposed tensor and a Fortran-order array (``DataFrame.values``, a memmap of a ``.npy``
    saved in that order) give the unchunked result: PyTorch's private fused kernel behind the
    chunked statistics reads features as if contiguous, and gave errors of 0.02-0.2 here."""
    torch.manual_seed(0)
    model = SetTransformer(3, 2, 2, dim_hidden=8, num_heads=2, num_inducing=3).eval()
    exact = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 50).transpose(1, 2)  # (2, 50, 3) with feature stride 50
    fortran = np.asfortranarray(np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32))
    pma = PMA(8, num_heads=2, num_seeds=2).eval()
    z = torch.randn(2, 8, 40).transpose(1, 2)
    with torch.no_grad():
        reference = exact(x.double().contiguous())
        assert (model(x, chunk_size=7).double() - reference).abs().max() < 1e-5
        assert (exact(x.double(), chunk_size=7) - reference).abs().max() < 1e-12
        single = exact(torch.from_numpy(np.ascontiguousarray(fortran)).double()[None])[0]
        assert (model(fortran, chunk_size=16).double() - single).abs().max() < 1e-5
        assert torch.allclose(pma(z, chunk_size=16), pma(z.contiguous()), atol=1e-5)
