"""Property-based fuzzing (hypothesis) of every block and model, and of ``attention``, ``masked_pool``
and ``pad_sets``/``unpad_sets``.

Each generated case draws a configuration (norm post/pre/None, score dot/additive/gaussian, top_k,
ff_dim, residual, out_proj, widths, heads), a dtype (float32, float64, bfloat16), a batch size 0-3,
a set size 0-5, a mask (none, random, all-True, with all-False rows), junk at padded positions
(NaN, +-inf, 1e6) and sometimes non-contiguous input, then checks:

- the output has the documented shape and dtype and is finite; per-element outputs are exactly
  zero at padded positions; an empty set follows the empty-set rule;
- padding values have no influence at all (bitwise equal to zero padding);
- permutation equivariance / invariance, and that each set alone (unpadded, batch 1) gives its row
  of the padded batch, to a dtype-dependent tolerance (skipped for bfloat16 with ``top_k``: its
  coarse logits tie often, and ties are broken by key position);
- in a third of the cases, gradients are finite and exactly zero at padded inputs (junk included);
- the chunked path (``chunk_size``) agrees, or raises ``ValueError`` for a model it cannot chunk;
- one drawn invalid input (wrong rank, width, dtype, a list, a 0/1 mask, a mask of the wrong shape,
  NaN in a real element, ...) raises the documented exception, whose message starts with the
  argument's name; NaN in a real element passes with the finiteness check switched off.

Each test runs ``SETTRANSFORMER_FUZZ_EXAMPLES`` cases (default 1000; derandomized, no example
database) and asserts that all of them ran; ``-s`` prints the count and CPU time per block::

    nice -n 19 .venv/bin/pytest -q -s -p no:randomly tests/test_fuzz.py

``SETTRANSFORMER_FUZZ_SHRINK=0`` reports a failure as found instead of minimising it (faster).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor

from settransformer import ISAB, MAB, PMA, SAB, DeepSets, SetTransformer, attention, masked_pool
from settransformer.nn.scores import make_score
from settransformer.nn.sets import pad_sets, unpad_sets
from settransformer.nn.validation import finite_checks

FUZZ = int(os.environ.get("SETTRANSFORMER_FUZZ_EXAMPLES", "1000"))
SHRINK = [Phase.shrink] if os.environ.get("SETTRANSFORMER_FUZZ_SHRINK") != "0" else []
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 8e-2}
NAN, INF = float("nan"), float("inf")
INVALID = [
    "rank",
    "width",
    "int",
    "list",
    "dtype",
    "device",
    "mask-int",
    "mask-shape",
    "mask-list",
    "nonfinite",
]
Draw = dict[str, Any]
pytestmark = pytest.mark.slow  # about 5-8 s of CPU per block at 1000 cases


def one_of(**choices: Any) -> st.SearchStrategy[Draw]:
    """A dict strategy: each keyword is a strategy or a list of values to sample from."""
    strategies = {
        k: v if isinstance(v, st.SearchStrategy) else st.sampled_from(v) for k, v in choices.items()
    }
    return st.fixed_dictionaries(strategies)


# fmt: off
dtypes = [torch.float32, torch.float32, torch.float64, torch.bfloat16]
small = st.integers(1, 3)
# Keyword options shared by the blocks and the Set Transformer; residual="input" only where dims allow,
# dropout in eval mode must have no effect.
options = one_of(norm=["post", "pre", None], score=["dot", "additive", "gaussian"],
                 top_k=[None, None, 1, 2, 3], ff_dim=[None, 1, 3], out_proj=[True, False],
                 residual=["auto", "projected", "input"], dropout=[0.0, 0.5])
batches = one_of(b=st.integers(0, 3), n=st.integers(0, 5), seed=st.integers(0, 2**31 - 1),
                 scale=[1e-3, 1.0, 30.0], duplicate=[False, True], zero=[False, True],
                 mask=["none", "random", "all-true", "empty-rows"], density=[0.3, 0.7], strided=[False, True],
                 empty_row=st.integers(0, 2), junk=["nan", "inf", "-inf", "big", "mixed"])
checks = one_of(grad=st.integers(0, 2), invalid=INVALID, feature=st.integers(0, 2**8), value=[NAN, INF, -INF],
                chunk=st.integers(0, 4))
block_case = one_of(heads=st.integers(1, 2), head_dim=small, dim_in=[1, 3, 0], dim_kv=st.integers(1, 4),
                    nq=st.integers(0, 3), bq=[False, True], count=small, dtype=dtypes, options=options)
model_case = one_of(heads=st.integers(1, 2), head_dim=small, dim_input=small, outputs=small, dim_output=small,
                    dtype=dtypes, options=options, encoder=["attention", "attention", "rff"],
                    inducing=[None, 1, 3], pooling=["pma", "pma", "mean", "sum", "max"],
                    layers=st.integers(0, 1), decoder_layers=st.integers(0, 1), pool=["mean", "sum", "max"])
sets_case = one_of(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4), dim=small, dtype=dtypes,
                   extra=[None, 0, 2])
SETTINGS = settings(max_examples=FUZZ, deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate, *SHRINK],
                    suppress_health_check=list(HealthCheck))
# fmt: on


def fuzz(name: str, case: st.SearchStrategy[Draw]) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """``body(case, batch, check)`` as a test over ``FUZZ`` generated examples that checks they all ran."""

    def wrap(body: Callable[..., None]) -> Callable[[], None]:
        def test() -> None:
            ran, cpu = 0, time.process_time()

            @SETTINGS
            @given(case=case, batch=batches, check=checks)
            def run(case: Draw, batch: Draw, check: Draw) -> None:
                nonlocal ran
                torch.manual_seed(batch["seed"])  # the module's initial weights
                with torch.no_grad():  # check_grad turns it back on
                    body(case, batch, check)
                ran += 1

            run()
            print(f"\nfuzz {name}: {ran} cases, 0 failures, {time.process_time() - cpu:.1f} s CPU")
            assert ran >= FUZZ, f"{name}: only {ran} of {FUZZ} cases ran"

        test.__doc__ = f"{FUZZ} generated cases of {name}: see the module docstring."
        return test

    return wrap


# ---------------------------------------------------------------- inputs


class Batch:
    """A padded set batch: ``x`` (junk at padded rows), ``clean`` (zeros there), ``mask``, ``real``."""

    def __init__(self, d: Draw, dim: int, dtype: torch.dtype) -> None:
        b, n = d["b"], d["n"]
        g = torch.Generator().manual_seed(d["seed"])
        values = torch.randn(b, n, dim, generator=g, dtype=torch.float64) * d["scale"]
        if n >= 2 and d["duplicate"]:
            values[:, 1] = values[:, 0]
        if n >= 1 and d["zero"]:
            values[:, -1] = 0.0
        real = torch.rand(b, n, generator=g) < d["density"]
        if d["mask"] in ("none", "all-true"):
            real[:] = True
        elif d["mask"] == "empty-rows" and b > 0:
            real[d["empty_row"] % b] = False
        table = torch.tensor([NAN, INF, -INF, 1e6], dtype=torch.float64)
        kinds = ["nan", "inf", "-inf", "big"]
        fill = (
            table[torch.randint(0, 4, values.shape, generator=g)]
            if d["junk"] == "mixed"
            else table[kinds.index(d["junk"])]
        )
        self.clean = values.masked_fill(~real[..., None], 0.0).to(dtype)
        self.x = torch.where(real[..., None], values, fill).to(dtype)
        if d["strided"]:  # both: another layout may round differently
            x, c = (t.transpose(0, 1).contiguous() for t in (self.x, self.clean))
            self.x, self.clean = x.transpose(0, 1), c.transpose(0, 1)
        self.mask, self.real, self.dtype = (None if d["mask"] == "none" else real), real, dtype
        self.perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]) if b else real.long()
        self.sets = [self.clean[i][real[i]][None] for i in range(b)]

    def permuted(self) -> tuple[Tensor, Tensor | None]:
        return gather(self.x, self.perm), None if self.mask is None else gather(self.mask, self.perm)


def gather(t: Tensor, perm: Tensor) -> Tensor:
    """``t[b, perm[b, i], ...]``: reorder the elements (dim 1) of every set of ``t``."""
    index = perm.view(*perm.shape, *[1] * (t.dim() - 2)).expand(*perm.shape, *t.shape[2:])
    return torch.gather(t, 1, index)


def close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    tol, actual, expected = TOL[dtype], actual.detach(), expected.detach()
    atol = tol * (1.0 + float(expected.abs().max())) if expected.numel() else tol
    torch.testing.assert_close(actual, expected, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def block_options(opts: Draw, dim_q: int, dim: int) -> Draw:
    return {**opts, "residual": "auto"} if opts["residual"] == "input" and dim_q != dim else opts


def approx_ok(batch: Batch, opts: Draw) -> bool:
    return not (batch.dtype == torch.bfloat16 and opts.get("top_k") is not None)


# ---------------------------------------------------------------- shared checks


def expect_error(call: Callable[[], Any], exc: type[Exception], name: str | tuple[str, ...]) -> None:
    """``call()`` raises ``exc`` with a message starting ``name:`` (or with one of several prefixes)."""
    try:
        call()
    except exc as e:
        assert str(e).startswith(name if isinstance(name, tuple) else f"{name}:"), str(e)
    else:
        raise AssertionError(f"expected {exc.__name__} naming {name}")


def check_invalid(
    call: Callable[..., Any], batch: Batch, dim: int, name: str, check: Draw, kinds: list[str] = INVALID
) -> None:
    """One drawn invalid input to ``call(x, mask)`` raises the documented exception naming the argument."""
    x, mask, (b, n) = batch.x, batch.mask, batch.real.shape
    kind = check["invalid"] if check["invalid"] in kinds else kinds[check["feature"] % len(kinds)]
    if kind == "nonfinite" and batch.real.any():
        bad = batch.clean.clone()
        i, j = (int(v) for v in batch.real.nonzero()[0])
        bad[i, j, check["feature"] % dim] = check["value"]
        expect_error(lambda: call(bad, mask), ValueError, name)
        with finite_checks(False):
            call(bad, mask)  # the opt-out: no error (that set's output is NaN)
        return
    other = torch.float64 if batch.dtype != torch.float64 else torch.float32
    cases: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
        "rank": (lambda: call(x[None], mask), ValueError, name),
        "width": (lambda: call(torch.zeros(b, n, dim + 1, dtype=batch.dtype), mask), ValueError, name),
        "int": (lambda: call(batch.clean.long(), mask), TypeError, name),
        "list": (lambda: call(batch.clean.tolist(), mask), TypeError, name),
        "dtype": (lambda: call(x.to(other), mask), TypeError, name),
        "device": (lambda: call(x.to("meta"), None if mask is None else mask.to("meta")), ValueError, name),
        "mask-int": (lambda: call(x, batch.real.long()), TypeError, "mask"),
        "mask-shape": (lambda: call(x, torch.ones(b, n + 1, dtype=torch.bool)), ValueError, "mask"),
        "mask-list": (lambda: call(x, batch.real.tolist()), TypeError, "mask"),
    }
    expect_error(*cases.get(kind, cases["rank"]))


def check_elementwise(
    block: Callable[..., Tensor], batch: Batch, dim_out: int, opts: Draw, check: Draw
) -> None:
    """A per-element block ``(B, N, D) -> (B, N, dim_out)``: every property but invalid input."""
    y = block(batch.x, batch.mask)
    assert y.shape == (*batch.real.shape, dim_out) and y.dtype == batch.dtype
    assert torch.isfinite(y).all(), "non-finite output"
    assert (y[~batch.real] == 0).all(), "padded outputs are not zero"
    assert torch.equal(block(batch.clean, batch.mask), y), "padding values changed the output"
    if approx_ok(batch, opts):
        close(block(*batch.permuted()), gather(y, batch.perm), batch.dtype, "equivariance")
        for i, s in enumerate(batch.sets):
            close(block(s)[0], y[i][batch.real[i]], batch.dtype, f"set {i} alone")
    check_grad(block, batch, check)


def check_pooled(
    model: Callable[..., Tensor],
    batch: Batch,
    shape: tuple[int, ...],
    opts: Draw,
    check: Draw,
    alone: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """A permutation-invariant map ``(B, N, D) -> (B, *shape)``: every property but invalid input.

    ``alone(i, set_i)``: the output for set ``i`` on its own (default ``model(set_i)``).
    """
    y = model(batch.x, batch.mask)
    assert y.shape == (batch.real.shape[0], *shape) and y.dtype == batch.dtype
    assert torch.isfinite(y).all(), "non-finite output"
    assert torch.equal(model(batch.clean, batch.mask), y), "padding values changed the output"
    if approx_ok(batch, opts):
        close(model(*batch.permuted()), y, batch.dtype, "invariance")
        for i, s in enumerate(batch.sets):
            close((alone(i, s) if alone else model(s))[0], y[i], batch.dtype, f"set {i} alone")
    check_grad(model, batch, check)
    return y


def check_grad(call: Callable[..., Tensor], batch: Batch, check: Draw) -> None:
    """In a third of the cases: gradients finite, and exactly zero at padded inputs (junk included)."""
    if batch.x.numel() == 0 or check["grad"] != 0:
        return
    x = batch.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        call(x, batch.mask).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "non-finite gradient"
    assert (x.grad[~batch.real] == 0).all(), "padded inputs got a gradient"


# ---------------------------------------------------------------- the blocks


def unpack(c: Draw) -> tuple[int, int, int, Draw]:
    """heads, width, input width (0 draws the block's width), options."""
    dim = c["heads"] * c["head_dim"]
    dim_in = c["dim_in"] or dim
    return c["heads"], dim, dim_in, block_options(c["options"], dim_in, dim)


@fuzz("MAB", block_case)
def test_mab(case: Draw, batch: Draw, check: Draw) -> None:
    h, dim, dim_q, opts = unpack(case)
    dtype = case["dtype"]
    mab = MAB(dim_q, case["dim_kv"], dim, h, **opts).to(dtype).eval()
    kv = Batch(batch, case["dim_kv"], dtype)
    b = kv.real.shape[0]
    q = torch.randn(b if case["bq"] else 1, case["nq"], dim_q).to(dtype)
    y = check_pooled(
        lambda x, m=None: mab(q, x, m),
        kv,
        (q.shape[1], dim),
        opts,
        check,
        alone=lambda i, s: mab(q[i : i + 1] if q.shape[0] > 1 else q, s),
    )
    if approx_ok(kv, opts) and q.shape[1] > 1:  # equivariant in the queries
        p = torch.randperm(q.shape[1])
        close(mab(q[:, p], kv.x, kv.mask), y[:, p], dtype, "query equivariance")
    if check["grad"] == 1:  # invalid queries (argument "q")
        expect_error(lambda: mab(q.new_zeros(b + 2, 1, dim_q), kv.x, kv.mask), ValueError, "q")
        expect_error(lambda: mab(q.long(), kv.x, kv.mask), TypeError, "q")
        expect_error(lambda: mab(q.flatten(0, 1), kv.x, kv.mask), ValueError, "q")
    else:
        check_invalid(lambda x, m=None: mab(q, x, m), kv, case["dim_kv"], "kv", check)


@fuzz("SAB", block_case)
def test_sab(case: Draw, batch: Draw, check: Draw) -> None:
    h, dim, dim_in, opts = unpack(case)
    sab = SAB(dim_in, dim, h, **opts).to(case["dtype"]).eval()
    x = Batch(batch, dim_in, case["dtype"])
    check_elementwise(sab, x, dim, opts, check)
    check_invalid(sab, x, dim_in, "x", check)


@fuzz("ISAB", block_case)
def test_isab(case: Draw, batch: Draw, check: Draw) -> None:
    h, dim, dim_in, opts = unpack(case)
    isab = ISAB(dim_in, dim, h, case["count"], **opts).to(case["dtype"]).eval()
    x = Batch(batch, dim_in, case["dtype"])
    check_elementwise(isab, x, dim, opts, check)
    check_invalid(isab, x, dim_in, "x", check)


@fuzz("PMA", block_case)
def test_pma(case: Draw, batch: Draw, check: Draw) -> None:
    h, dim, _, opts = unpack({**case, "dim_in": 0})
    dtype = case["dtype"]
    pma = PMA(dim, h, case["count"], **opts).to(dtype).eval()
    z = Batch(batch, dim, dtype)
    y = check_pooled(pma, z, (case["count"], dim), opts, check)
    # the empty-set rule: an empty set pools to the seeds through the block with zero attention
    empty = pma(torch.zeros(1, 0, dim, dtype=dtype))[0]
    for i in (~z.real.any(dim=1)).nonzero().flatten().tolist():
        close(y[i], empty, dtype, "empty set")
    check_invalid(pma, z, dim, "z", check)


# ---------------------------------------------------------------- the models


def check_chunked(model: Any, batch: Batch, y: Tensor, ok: bool, check: Draw) -> None:
    """``chunk_size`` agrees with the ordinary forward, or raises ``ValueError`` if it cannot chunk."""
    if check["chunk"] == 0:
        return
    call = lambda: model(batch.x, batch.mask, chunk_size=check["chunk"])  # noqa: E731
    if ok or batch.real.shape[1] == 0:  # N = 0 takes the ordinary path
        close(call(), y, batch.dtype, "chunked")
    else:
        expect_error(call, ValueError, ("model.", "encoder[", "pma."))


@fuzz("SetTransformer", model_case)
def test_set_transformer(case: Draw, batch: Draw, check: Draw) -> None:
    h, dim, dim_input, opts = unpack({**case, "dim_in": case["dim_input"]})
    opts = {**opts, "residual": "auto" if opts["residual"] == "input" else opts["residual"]}
    config = {
        "dim_hidden": dim,
        "num_heads": h,
        "num_inducing": case["inducing"],
        "encoder": case["encoder"],
        "pooling": case["pooling"],
        "num_decoder_layers": case["decoder_layers"],
        **opts,
    }
    sizes = (dim_input, case["outputs"], case["dim_output"])
    layers = case["layers"] + (case["encoder"] != "rff")  # attention: 1 or 2 layers, rFF: 0 or 1
    if layers == 0 and dim_input != dim:  # an identity encoder cannot change the width
        expect_error(
            lambda: SetTransformer(*sizes, num_encoder_layers=0, **config), ValueError, "num_encoder_layers"
        )
        layers = 1
    model = SetTransformer(*sizes, num_encoder_layers=layers, **config).to(case["dtype"]).eval()
    x = Batch(batch, dim_input, case["dtype"])
    y = check_pooled(model, x, sizes[1:], opts, check)
    dot = opts["score"] == "dot" and opts["top_k"] is None
    encoder_ok = case["encoder"] == "rff" or (case["inducing"] is not None and dot)
    check_chunked(model, x, y, encoder_ok and (case["pooling"] != "pma" or dot), check)
    check_invalid(model, x, dim_input, "x", check)


@fuzz("DeepSets", model_case)
def test_deep_sets(case: Draw, batch: Draw, check: Draw) -> None:
    sizes = (case["dim_input"], case["outputs"], case["dim_output"])
    model = (
        DeepSets(
            *sizes,
            dim_hidden=case["head_dim"],
            pool=case["pool"],
            num_encoder_layers=case["layers"] + 1,
            num_decoder_layers=case["decoder_layers"],
        )
        .to(case["dtype"])
        .eval()
    )
    x = Batch(batch, case["dim_input"], case["dtype"])
    y = check_pooled(model, x, sizes[1:], {}, check)
    check_chunked(model, x, y, True, check)
    check_invalid(model, x, case["dim_input"], "x", check)


# ---------------------------------------------------------------- functions


@fuzz("attention", block_case)
def test_attention(case: Draw, batch: Draw, check: Draw) -> None:
    h, dh, dv, dtype = case["heads"], case["head_dim"], case["count"], case["dtype"]
    score = make_score(case["options"]["score"], h, dh)
    score = score.to(dtype) if isinstance(score, torch.nn.Module) else score
    opts = {"score": score, "top_k": case["options"]["top_k"]}
    kv = Batch(batch, h * (dh + dv), dtype)  # keys and values as one set (B, N, H * (Dh + Dv))
    b = kv.real.shape[0]
    q = torch.randn(b if case["bq"] else 1, h, case["nq"], dh).to(dtype)

    def split(x: Tensor) -> list[Tensor]:
        return list(x.unflatten(-1, (h, dh + dv)).transpose(1, 2).split([dh, dv], dim=-1))

    def attend(x: Any, mask: Any = None, qi: Tensor = q) -> Tensor:  # (B, Nq, H * Dv)
        return attention(qi, *split(x), mask, **opts).transpose(1, 2).flatten(2)

    y = check_pooled(
        attend,
        kv,
        (q.shape[2], h * dv),
        opts,
        check,
        alone=lambda i, s: attend(s, qi=q[i : i + 1] if q.shape[0] > 1 else q),
    )
    assert (y[~kv.real.any(dim=1)] == 0).all(), "the empty-set rule: attention output zero"
    k, v = split(kv.x)
    bad: dict[str, Callable[[], Any]] = {
        "q": lambda: attention(q.flatten(0, 1), k, v),
        "k": lambda: attention(q, k.long(), v),
        "v": lambda: attention(q, k, v[:, :, :0] if v.shape[2] else v[:, :, :, None]),
        "mask": lambda: attention(q, k, v, kv.real.long()),
    }
    name = sorted(bad)[check["feature"] % len(bad)]
    expect_error(bad[name], TypeError if name in ("k", "mask") else ValueError, name)


@fuzz("masked_pool", block_case)
def test_masked_pool(case: Draw, batch: Draw, check: Draw) -> None:
    how = ["mean", "sum", "max"][case["count"] - 1]
    x = Batch(batch, case["head_dim"], case["dtype"])
    y = check_pooled(lambda x, m=None: masked_pool(x, m, how), x, (case["head_dim"],), {}, check)
    assert (y[~x.real.any(dim=1)] == 0).all(), "an empty set pools to zero"
    kinds = ["rank", "int", "list", "mask-int", "mask-shape", "mask-list"]
    check_invalid(lambda x, m=None: masked_pool(x, m, how), x, case["head_dim"], "x", check, kinds)


@fuzz("pad_sets", sets_case)
def test_pad_sets(case: Draw, batch: Draw, check: Draw) -> None:
    sizes, dim, dtype = case["sizes"], case["dim"], case["dtype"]
    sets = [torch.randn(n, dim).to(dtype) for n in sizes]
    max_size = None if case["extra"] is None else max(sizes) + case["extra"]
    x, mask = pad_sets(sets, max_size=max_size)
    assert x.shape == (len(sizes), max(sizes) if max_size is None else max_size, dim) and x.dtype == dtype
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == sizes and (x[~mask] == 0).all()
    assert all(torch.equal(a, s) for a, s in zip(unpad_sets(x, mask), sets, strict=True))
    wrong = torch.zeros(1, dim + 1, dtype=dtype)
    bad: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: pad_sets([*sets, wrong]), ValueError, f"sets[{len(sets)}]"),
        (lambda: pad_sets([s.tolist() for s in sets]), TypeError, "sets[0]"),
        (lambda: pad_sets([s[None] for s in sets]), ValueError, "sets[0]"),
        (lambda: unpad_sets(x, mask.long()), TypeError, "mask"),
        (lambda: pad_sets(sets, max_size=-1), ValueError, "max_size"),
    ]
    if max(sizes) > 0:
        bad.append((lambda: pad_sets(sets, max_size=max(sizes) - 1), ValueError, "max_size"))
    expect_error(*bad[check["feature"] % len(bad)])
