"""``settransformer.nn.blocks``: MAB, SAB, ISAB, PMA.

Symmetry (permutation equivariance / invariance), masking (padding is invisible), agreement with the
float64 reference of the paper's equations in ``reference.py``, and gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import reference as ref
import torch
from torch import Tensor, nn

from settransformer.nn import workspace
from settransformer.nn.blocks import ISAB, PMA, SAB
from settransformer.nn.mab import FORMS, MAB, attention_forms

DIM, HEADS, NUM_INDUCING, NUM_SEEDS, NQ = 16, 4, 3, 2, 4
KINDS = ["mab", "sab", "isab", "pma"]

# Every norm x ff_dim, each with the paper's residual and W^O and with the official code's variant.
OPTIONS: list[dict[str, Any]] = [
    {"norm": norm, "ff_dim": ff_dim, **variant}
    for norm in ("post", "pre", None)
    for ff_dim in (None, 24)
    for variant in ({}, {"residual": "projected", "out_proj": False})
] + [
    {"residual": "input"},
    {"residual": "projected", "norm": "pre"},
    {"scale": 0.7, "out_proj": False},
]


def opt_id(opt: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in opt.items()) or "default"


def dims(kind: str, opt: dict[str, Any]) -> tuple[int, int]:
    """(query width, set width): inputs narrower than the block unless residual='input' needs dim."""
    dim_q = DIM if opt.get("residual") == "input" else 3
    dim_in = DIM if kind == "pma" or opt.get("residual") == "input" else 5
    return dim_q, dim_in


def build(kind: str, **opt: Any) -> nn.Module:
    dim_q, dim_in = dims(kind, opt)
    block: nn.Module
    if kind == "mab":
        block = MAB(dim_q, dim_in, DIM, HEADS, **opt)
    elif kind == "sab":
        block = SAB(dim_in, DIM, HEADS, **opt)
    elif kind == "isab":
        block = ISAB(dim_in, DIM, HEADS, NUM_INDUCING, **opt)
    else:
        block = PMA(DIM, HEADS, NUM_SEEDS, **opt)
    return block.eval()


def queries(
    kind: str, b: int, opt: dict[str, Any], dtype: torch.dtype = torch.float32, nq: int = NQ
) -> Tensor | None:
    return torch.randn(b, nq, dims(kind, opt)[0], dtype=dtype) if kind == "mab" else None


def run(block: nn.Module, x: Tensor, mask: Tensor | None, q: Tensor | None) -> Tensor:
    return block(x, mask) if q is None else block(q, x, mask)


def equivariant(kind: str) -> bool:
    """SAB/ISAB output one row per element; MAB (over its key set) and PMA pool the set."""
    return kind in ("sab", "isab")


# ---------------------------------------------------------------- permutation symmetry


@pytest.mark.parametrize("use_mask", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("opt", OPTIONS, ids=opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_permutation_symmetry(
    kind: str, opt: dict[str, Any], use_mask: bool, padded, permute, gather
) -> None:
    """SAB/ISAB: permuting the set permutes the output. MAB (key set) and PMA: output unchanged."""
    block = build(kind, **opt)
    x, mask, _ = padded([7, 4, 1, 6], dims(kind, opt)[1], n=7)
    if not use_mask:
        mask = None
    q = queries(kind, 4, opt)
    out = run(block, x, mask, q)
    xp, mp, perm = permute(x, mask)
    out_p = run(block, xp, mp, q)
    expected = gather(out, perm) if equivariant(kind) else out
    torch.testing.assert_close(out_p, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opt", OPTIONS[:4], ids=opt_id)
def test_mab_is_equivariant_in_its_queries(opt: dict[str, Any], permute, gather) -> None:
    block = build("mab", **opt)
    q, kv = torch.randn(3, 6, 3), torch.randn(3, 5, 5)
    mask = torch.tensor([[True] * 5, [True, False, True, False, True], [False] * 5])
    qp, _, perm = permute(q)
    torch.testing.assert_close(block(qp, kv, mask), gather(block(q, kv, mask), perm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("nq", "nk"), [(NQ, 5), (2, 40), (40, 2)])
def test_mab_query_batch_of_one_is_shared(nq: int, nk: int) -> None:
    """``q: (1, Nq, dim_q)`` is shared by every set, whatever the relative sizes of queries and keys."""
    block = build("mab")
    q, kv = torch.randn(1, nq, 3), torch.randn(3, nk, 5)
    mask = torch.ones(3, nk, dtype=torch.bool)
    mask[1, 1:] = False
    out = block(q, kv, mask)
    assert out.shape == (3, nq, DIM)
    torch.testing.assert_close(out, block(q.expand(3, -1, -1), kv, mask), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the reference equations


# Small and large sets, and many queries over few keys (MAB), so that every exact form of the
# attention the blocks may pick by cost is compared with the reference.
SIZES = {"small": ([6, 3, 0, 5], 7, NQ), "large": ([40, 17, 0], 48, 2), "few-keys": ([2, 3, 0], 4, 40)}


@pytest.mark.parametrize("opt", OPTIONS, ids=opt_id)
@pytest.mark.parametrize(
    ("kind", "sizes"), [(k, s) for k in KINDS for s in SIZES if k == "mab" or s != "few-keys"]
)
def test_matches_float64_reference(kind: str, sizes: str, opt: dict[str, Any], padded) -> None:
    """A padded float64 batch (padding in the middle, an empty set) equals the reference run per set."""
    set_sizes, n, nq = SIZES[sizes]
    block = build(kind, **opt).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so they are checked too
        for name, p in block.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    x, mask, sets = padded(set_sizes, dims(kind, opt)[1], n=n, dtype=torch.float64)
    q = queries(kind, len(set_sizes), opt, torch.float64, nq=nq)
    out = run(block, x, mask, q)
    p = ref.params_of(block, "m")
    o = ref.BlockOptions.from_kwargs(HEADS, opt)
    for i, s in enumerate(sets):
        if kind == "mab":
            assert q is not None
            expected, got = ref.mab(p, "m", q[i], s, o), out[i]
        elif kind == "pma":
            expected, got = ref.pma(p, "m", s, o), out[i]
        else:
            expected = (ref.sab if kind == "sab" else ref.isab)(p, "m", s, o)
            got = out[i][mask[i]]
            assert (out[i][~mask[i]] == 0).all()
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_paper_and_official_semantics_differ() -> None:
    """The options matter: the reference itself tells the paper's MAB from the official code's."""
    torch.manual_seed(3)
    block = build("sab").double()
    x = torch.randn(6, 5, dtype=torch.float64)
    p = ref.params_of(block, "m")
    paper = ref.sab(p, "m", x, ref.BlockOptions(HEADS))
    official = ref.sab(p, "m", x, ref.BlockOptions(HEADS, residual="projected", out_proj=False, scale=0.25))
    assert (paper - official).abs().max() > 1e-2


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("opt", [{}, {"norm": "pre"}, {"norm": None, "ff_dim": 24}], ids=opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_set_alone(kind: str, opt: dict[str, Any], padded) -> None:
    block = build(kind, **opt)
    x, mask, sets = padded([5, 2, 7, 3], dims(kind, opt)[1], n=9)
    q = queries(kind, 4, opt)
    out = run(block, x, mask, q)
    for i, s in enumerate(sets):
        alone = run(block, s[None], None, None if q is None else q[i : i + 1])[0]
        got = out[i][mask[i]] if equivariant(kind) else out[i]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("junk", [1e6, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_values_change_nothing(kind: str, junk: float, padded) -> None:
    block = build(kind)
    x, mask, _ = padded([5, 2, 0], dims(kind, {})[1], n=6)
    q = queries(kind, 3, {})
    out = run(block, x, mask, q)
    out_junk = run(block, x.masked_fill(~mask[..., None], junk), mask, q)
    assert torch.isfinite(out_junk).all()
    torch.testing.assert_close(out_junk, out, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sab", "isab"])
def test_outputs_at_padded_positions_are_exactly_zero(kind: str, padded) -> None:
    block = build(kind)
    x, mask, _ = padded([5, 2, 0], 5, n=6)
    out = block(x, mask)
    assert (out[~mask] == 0).all()
    assert (out[mask] != 0).any(dim=-1).all()


@pytest.mark.parametrize("opt", [{}, {"norm": "pre"}], ids=opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_inputs_get_zero_gradient(kind: str, opt: dict[str, Any], padded) -> None:
    block = build(kind, **opt)
    x, mask, _ = padded([5, 2, 0], dims(kind, opt)[1], n=6)
    x.requires_grad_()
    q = queries(kind, 3, opt)
    out = run(block, x, mask, q)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None
    assert (x.grad[~mask] == 0).all()
    assert (x.grad[mask] != 0).any(dim=-1).all()


@pytest.mark.parametrize("opt", [{}, {"norm": "pre"}, {"norm": None}], ids=opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_set_is_finite(kind: str, opt: dict[str, Any]) -> None:
    """An all-padding set, alone or beside a real one: finite outputs and finite gradients everywhere."""
    block = build(kind, **opt)
    x = torch.randn(2, 4, dims(kind, opt)[1], requires_grad=True)
    mask = torch.tensor([[False] * 4, [True, True, False, True]])
    q = queries(kind, 2, opt)
    out = run(block, x, mask, q)
    assert torch.isfinite(out).all()
    if equivariant(kind):
        assert (out[0] == 0).all()
    out.square().sum().backward()
    assert x.grad is not None and (x.grad[0] == 0).all() and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_only_empty_sets(kind: str) -> None:
    """``(B, 0, D)`` with a ``(B, 0)`` mask (what ``pad_sets`` returns for empty sets) is accepted and
    gives what a batch of all-padding sets gives."""
    block = build(kind)
    dim_in = dims(kind, {})[1]
    q = queries(kind, 2, {})
    out = run(block, torch.zeros(2, 0, dim_in), torch.zeros(2, 0, dtype=torch.bool), q)
    padding = run(block, torch.randn(2, 3, dim_in), torch.zeros(2, 3, dtype=torch.bool), q)
    assert torch.isfinite(out).all()
    if equivariant(kind):
        assert out.shape == (2, 0, DIM)
    else:
        torch.testing.assert_close(out, padding, atol=1e-6, rtol=1e-5)


def test_every_pinned_form_agrees_on_sets_of_no_elements_without_a_mask() -> None:
    """``(B, 0, D)`` without a mask reads as empty sets in every form (the pooled one added its value
    bias to an attention over no keys)."""
    torch.manual_seed(0)
    pma = PMA(8, 2, 3).eval()
    z = torch.zeros(2, 0, 8)
    expected = pma(z, torch.zeros(2, 0, dtype=torch.bool))
    for form in FORMS:
        with attention_forms(pma, form):
            torch.testing.assert_close(pma(z), expected)


# ---------------------------------------------------------------- gradients


# (kind, queries, set size): tiny shapes, plus shapes where the blocks choose their other exact
# forms of the attention (few queries over a larger set, many queries over few keys).
GRAD_CASES = [("mab", 2, 3), ("mab", 2, 12), ("mab", 12, 2), ("sab", 0, 3), ("isab", 0, 3), ("isab", 0, 12)]
GRAD_CASES += [("pma", 0, 3), ("pma", 0, 12)]


@pytest.mark.parametrize("opt", [{}, {"norm": "pre", "ff_dim": 6}, {"norm": None}], ids=opt_id)
@pytest.mark.parametrize(("kind", "nq", "n"), GRAD_CASES)
def test_gradcheck(kind: str, nq: int, n: int, opt: dict[str, Any]) -> None:
    """float64 gradcheck with a mask and an empty set: full w.r.t. the inputs, and w.r.t. every
    parameter in gradcheck's fast mode (a random projection of the Jacobian; the full check takes
    tens of seconds)."""
    dim_in = 4 if kind == "pma" else 3
    block = {
        "mab": lambda: MAB(2, dim_in, 4, 2, **opt),
        "sab": lambda: SAB(dim_in, 4, 2, **opt),
        "isab": lambda: ISAB(dim_in, 4, 2, 2, **opt),
        "pma": lambda: PMA(4, 2, 2, **opt),
    }[kind]().double()
    x = torch.randn(3, n, dim_in, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, ::2] = False
    mask[2] = False
    q = torch.randn(3, nq, 2, dtype=torch.float64, requires_grad=True) if kind == "mab" else None
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def f(x: Tensor, q: Tensor | None, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(
            block, dict(zip(names, ps)), (x, mask) if q is None else (q, x, mask)
        )

    def f_inputs(x: Tensor, q: Tensor | None) -> Tensor:
        return f(x, q, *params)

    assert torch.autograd.gradcheck(f_inputs, (x, q), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(
        f, (x.detach(), None if q is None else q.detach(), *params), fast_mode=True
    )


# ---------------------------------------------------------------- dropout


def test_dropout_only_in_training() -> None:
    block = SAB(5, DIM, HEADS, dropout=0.3)
    x = torch.randn(2, 6, 5)
    block.train()
    a, b = block(x), block(x)
    assert not torch.allclose(a, b)
    block.eval()
    torch.testing.assert_close(block(x), block(x))


@pytest.mark.parametrize("opt", OPTIONS, ids=opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_in_place_tail_without_autograd_changes_nothing(kind: str, opt: dict[str, Any]) -> None:
    """Without autograd a block's ReLU and residual sums run in place on its own new tensors:
    the same result as with autograd (the same bits, except an ISAB's second attention, which runs
    through InducedRows with its keys prescaled), and the caller's queries and set are left as they were."""
    torch.manual_seed(7)
    block = build(kind, **opt)
    x, q = torch.randn(3, 6, dims(kind, opt)[1]), queries(kind, 3, opt)
    mask = torch.arange(6)[None] < torch.tensor([[6], [2], [5]])
    x0, q0 = x.clone(), None if q is None else q.clone()
    with_grad = run(block, x, mask, q)
    with torch.no_grad():
        without = run(block, x, mask, q)
    assert with_grad.requires_grad and not without.requires_grad
    if kind == "isab":
        torch.testing.assert_close(without, with_grad.detach(), atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(without, with_grad.detach())
    assert torch.equal(x, x0) and (q is None or torch.equal(q, q0))


def test_in_place_tail_keeps_the_dtype_under_autocast() -> None:
    """Under bfloat16 autocast the raw float32 queries (``residual="input"``) plus the bfloat16
    attention output is a float32 sum: without autograd too, not a bfloat16 one written in place."""
    torch.manual_seed(8)
    block = MAB(DIM, 5, DIM, HEADS, residual="input").eval()
    q, x = torch.randn(2, 4, DIM), torch.randn(2, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = block(q, x)
        with torch.no_grad():
            without = block(q, x)
    assert without.dtype == with_grad.dtype
    assert torch.equal(without, with_grad.detach())


@pytest.mark.parametrize("norm", ["post", "pre", None])
@pytest.mark.parametrize(("num_inducing", "form"), [(4, "induced"), (64, "pooled")])
def test_isab_row_blocks_without_autograd_equal_one_pass(
    monkeypatch: pytest.MonkeyPatch, norm, num_inducing: int, form: str
) -> None:
    import settransformer.nn.attention as attention
    import settransformer.nn.blocks as blocks

    monkeypatch.setattr(attention, "REWRITE_MIN_SET", 1)  # the rewrites over blocks of 6 rows
    torch.manual_seed(0)
    isab = ISAB(3, 8, num_heads=2, num_inducing=num_inducing, norm=norm).eval()
    assert isab.mab1.choose_form(6, num_inducing) == form  # both forms of the row blocks are covered
    x = torch.randn(3, 41, 3)
    mask = torch.arange(41)[None] < torch.tensor([[41], [17], [0]])
    whole = isab(x, mask)  # grad enabled: one pass over all rows
    monkeypatch.setattr(blocks, "ROW_BLOCK", 20)  # 20 // 3 = 6 rows per block, not dividing 41
    monkeypatch.setattr(blocks, "MIN_BLOCK_ROWS", 1)
    with torch.no_grad():
        blocked = isab(x, mask)
    assert whole.requires_grad and not blocked.requires_grad
    torch.testing.assert_close(blocked, whole.detach(), atol=1e-6, rtol=1e-6)
    assert blocked[1, 17:].abs().max() == 0 and blocked[2].abs().max() == 0


def _kept(mab: MAB) -> dict:
    return workspace._KEPT.__dict__.get("blocks", {}).get(mab, {})


def test_isab_keeps_its_inference_buffers_from_call_to_call() -> None:
    torch.manual_seed(0)
    isab = ISAB(3, 8, num_heads=2, num_inducing=4).eval()
    x1, x2 = torch.randn(2, 30, 3), torch.randn(3, 20, 3)
    with torch.no_grad():
        y1 = isab(x1)
        (space,) = _kept(isab.mab1).values()
        pointers = {name: buf.data_ptr() for name, buf in space.buffers.items()}
        y1_before = y1.clone()
        y2 = isab(x2)  # fewer rows: the same buffers
    assert pointers and {name: buf.data_ptr() for name, buf in space.buffers.items()} == pointers
    assert torch.equal(y1, y1_before)  # a result is never a kept buffer
    assert all(y.data_ptr() not in pointers.values() for y in (y1, y2))
    torch.testing.assert_close(y2, isab(x2).detach(), atol=1e-6, rtol=1e-5)


def test_isab_kept_buffers_per_thread_mode_and_dtype() -> None:
    import threading

    torch.manual_seed(0)
    isab = ISAB(3, 8, num_heads=2, num_inducing=4).eval()
    xs = [torch.randn(2, 25, 3) for _ in range(4)]
    expected = [isab(x).detach() for x in xs]
    results: dict[int, list[Tensor]] = {}

    def serve(i: int) -> None:
        with torch.no_grad():
            results[i] = [isab(x) for x in xs for _ in range(20)][::20]

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        for y, e in zip(got, expected):
            torch.testing.assert_close(y, e, atol=1e-6, rtol=1e-5)
    assert _kept(isab.mab1) == {}  # the threads' buffers are theirs, not this thread's
    with torch.inference_mode():
        isab(xs[0])
    with torch.no_grad():  # buffers made in inference mode cannot be written outside it
        isab(xs[0])
        isab.double()(xs[0].double())
    assert len(_kept(isab.mab1)) == 3


def test_isabs_on_a_thread_share_their_kept_buffers() -> None:
    import gc

    workspace.clear_kept_buffers()
    torch.manual_seed(0)
    first = ISAB(3, 8, num_heads=2, num_inducing=4).eval()
    second = ISAB(8, 8, num_heads=2, num_inducing=4).eval()
    x = torch.randn(2, 30, 3)
    expected = second(first(x)).detach()
    with torch.no_grad():
        got = second(first(x))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    (space,) = _kept(first.mab1).values()
    assert list(_kept(second.mab1).values()) == [space]
    # two set-sized buffers (queries, heads' outputs) reused by the tail's steps, the block's own
    # output standing for a third (scores, then the tail's result), and the layer norms' statistics
    assert set(space.buffers) == {"q", "o", "ln_stats"}
    shared = workspace._KEPT.shared
    del first, space
    gc.collect()
    assert len(shared) == 1  # the second block still holds them
    del second
    gc.collect()
    assert len(shared) == 0  # and they go with the last block that used them


class _WithInnerISAB(nn.Module):
    """A feed-forward module that runs another ISAB: the outer block's buffers are in use meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ISAB(8, 8, num_heads=2, num_inducing=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def test_an_isab_within_an_isab_does_not_take_the_kept_buffers_in_use() -> None:
    torch.manual_seed(0)
    outer = ISAB(3, 8, num_heads=2, num_inducing=4).eval()
    outer.mab1.ff = _WithInnerISAB().eval()
    x = torch.randn(2, 30, 3)
    expected = outer(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(outer(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(outer(x), expected, atol=1e-6, rtol=1e-5)


def test_isab_kept_buffers_are_bounded_and_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import gc
    import pickle

    import settransformer.nn.blocks as blocks

    isab = ISAB(3, 8, num_heads=2, num_inducing=4).eval()
    keys = set(isab.state_dict())
    with torch.no_grad():
        isab(torch.randn(2, 30, 3))
        assert _kept(isab.mab1)
        workspace.clear_kept_buffers()
        assert _kept(isab.mab1) == {}
        monkeypatch.setattr(blocks, "KEPT_BUFFER_ELEMENTS", 8 * 59)  # 59 rows of width 8 or fewer
        isab(torch.randn(2, 30, 3))  # 60 rows in one call: fresh buffers, freed after the call
        assert _kept(isab.mab1) == {}
        isab(torch.randn(1, 59, 3))
        assert _kept(isab.mab1)
    assert set(isab.state_dict()) == keys
    copy.deepcopy(isab), pickle.loads(pickle.dumps(isab))
    mab = isab.mab1
    kept = workspace._KEPT.blocks
    before = len(kept)
    del isab, mab
    gc.collect()
    assert len(kept) == before - 1  # the buffers go with their block


def test_constructor_errors_name_the_callers_arguments() -> None:
    """SAB and ISAB name their own ``dim_in`` (MAB's ``dim_q``/``dim_kv`` mean nothing to their
    callers), SetTransformer its ``dim_hidden``; NumPy scalars pass where Python numbers do; a score
    module built for other heads is refused when the block is built (it failed in the forward)."""
    import numpy as np

    from settransformer import SetTransformer
    from settransformer.nn.scores import AdditiveScore, GaussianScore

    with pytest.raises(ValueError, match="dim_in: expected a positive integer, got 0"):
        SAB(0, 8, 2)
    with pytest.raises(ValueError, match="dim_in: expected a positive integer, got 0"):
        ISAB(0, 8, 2, 4)
    with pytest.raises(ValueError, match="num_heads: must divide dim_hidden=10, got 4"):
        SetTransformer(3, 1, 1, dim_hidden=10, num_heads=4)
    block = SAB(3, 8, 2, top_k=np.int64(2), dropout=np.float32(0.1))  # type: ignore[arg-type]
    assert block.mab.top_k == 2 and isinstance(block.mab.top_k, int)
    with pytest.raises(ValueError, match="GaussianScore was built for num_heads=3, but the block has"):
        SAB(3, 8, 2, score=GaussianScore(3))
    with pytest.raises(ValueError, match="AdditiveScore was built for head_dim=8, but the block has"):
        SAB(3, 8, 2, score=AdditiveScore(2, 8))
