"""Bad input to every block and model: the right exception, and a message that names the argument
and what was expected (``x: expected a floating-point tensor of shape (B, N, 5), got shape (7, 5)``)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from settransformer.nn.blocks import ISAB, PMA, SAB
from settransformer.nn.mab import MAB
from settransformer.nn.models import DeepSets, SetTransformer
from settransformer.nn.sets import masked_pool
from settransformer.nn.validation import check_finite, check_mask, check_set, zero_padding

B, N = 2, 6


def _mab() -> Callable[[Any, Any], Tensor]:
    mab = MAB(3, 5, 16, 4)
    return lambda x, mask=None: mab(torch.randn(B, 4, 3), x, mask)


def _mab_q() -> Callable[[Any, Any], Tensor]:
    mab = MAB(3, 5, 16, 4)
    return lambda q, mask=None: mab(q, torch.randn(B, N, 5), mask)


# id -> (forward(x, mask), argument name, feature size)
TARGETS: dict[str, tuple[Callable[[], Callable[..., Tensor]], str, int]] = {
    "mab-kv": (_mab, "kv", 5),
    "sab": (lambda: SAB(5, 16, 4), "x", 5),
    "isab": (lambda: ISAB(5, 16, 4, 3), "x", 5),
    "pma": (lambda: PMA(16, 4, 2), "z", 16),
    "set-transformer": (lambda: SetTransformer(5, 2, 3, dim_hidden=16, num_inducing=4), "x", 5),
    "set-transformer-rff": (lambda: SetTransformer(5, 2, 3, dim_hidden=16, encoder="rff"), "x", 5),
    "deep-sets": (lambda: DeepSets(5, 2, 3, dim_hidden=16), "x", 5),
}


def expect(name: str, *parts: str) -> str:
    """A regex: the message starts with ``name:`` and contains every part, in order."""
    return "^" + re.escape(name) + ":.*" + ".*".join(re.escape(p) for p in parts)


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> tuple[Callable[..., Tensor], str, int]:
    make, name, dim = TARGETS[request.param]
    return make(), name, dim


def test_valid_input_runs(target) -> None:
    forward, _, dim = target
    mask = torch.ones(B, N, dtype=torch.bool)
    assert torch.isfinite(forward(torch.randn(B, N, dim), mask)).all()


@pytest.mark.parametrize("shape", [(N, "d"), ("d",), (1, B, N, "d")], ids=["2d", "1d", "4d"])
def test_wrong_rank(target, shape: tuple[Any, ...]) -> None:
    forward, name, dim = target
    shape = tuple(dim if s == "d" else s for s in shape)
    with pytest.raises(ValueError, match=expect(name, f"(B, N, {dim})", f"got shape {shape}")):
        forward(torch.randn(*shape))


def test_two_dimensional_input_gets_a_hint(target) -> None:
    forward, _, dim = target
    with pytest.raises(ValueError, match="unsqueeze"):
        forward(torch.randn(N, dim))


def test_wrong_feature_size(target) -> None:
    forward, name, dim = target
    with pytest.raises(ValueError, match=expect(name, f"(B, N, {dim})", f"got shape ({B}, {N}, {dim + 1})")):
        forward(torch.randn(B, N, dim + 1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_input(target, dtype: torch.dtype) -> None:
    forward, name, dim = target
    x = torch.ones(B, N, dim, dtype=dtype)
    with pytest.raises(TypeError, match=expect(name, "floating-point", f"(B, N, {dim})", str(dtype))):
        forward(x)


@pytest.mark.parametrize("make", [lambda d: np.zeros((B, N, d)), lambda d: [[[0.0] * d] * N] * B])
def test_non_tensor_input(target, make: Callable[[int], Any]) -> None:
    forward, name, dim = target
    x = make(dim)
    with pytest.raises(TypeError, match=expect(name, f"(B, N, {dim})", type(x).__name__)):
        forward(x)


@pytest.mark.parametrize("shape", [(B, N + 1), (B,), (B, N, 1), (1, N)])
def test_mask_wrong_shape(target, shape: tuple[int, ...]) -> None:
    forward, _, dim = target
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=expect("mask", f"(B, N) = ({B}, {N})", f"got shape {shape}")):
        forward(torch.randn(B, N, dim), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_mask_wrong_dtype(target, dtype: torch.dtype) -> None:
    forward, _, dim = target
    with pytest.raises(TypeError, match=expect("mask", "bool", f"({B}, {N})", str(dtype))):
        forward(torch.randn(B, N, dim), torch.ones(B, N, dtype=dtype))


def test_mask_not_a_tensor(target) -> None:
    forward, _, dim = target
    with pytest.raises(TypeError, match=expect("mask", "bool", "list")):
        forward(torch.randn(B, N, dim), [[True] * N] * B)


def test_mask_on_another_device(target) -> None:
    forward, _, dim = target
    with pytest.raises(ValueError, match=expect("mask", "meta", "cpu")):
        forward(torch.randn(B, N, dim), torch.ones(B, N, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------- MAB's queries


def test_mab_query_checks() -> None:
    forward = _mab_q()
    with pytest.raises(ValueError, match=expect("q", "(B, N, 3)", "got shape (4, 3)")):
        forward(torch.randn(4, 3))
    with pytest.raises(ValueError, match=expect("q", "(B, N, 3)", f"got shape ({B}, 4, 4)")):
        forward(torch.randn(B, 4, 4))
    with pytest.raises(TypeError, match=expect("q", "floating-point", "torch.int64")):
        forward(torch.ones(B, 4, 3, dtype=torch.int64))


def test_mab_mismatched_batch() -> None:
    mab = MAB(3, 5, 16, 4)
    with pytest.raises(ValueError, match=expect("q", "batch size 3", "kv", "2")):
        mab(torch.randn(3, 4, 3), torch.randn(2, N, 5))


# ---------------------------------------------------------------- constructors


def _bad_constructors() -> list[tuple[str, Callable[[], nn.Module], str]]:
    """(id, constructor call, argument the message must start with)."""
    c: list[tuple[str, Callable[[], nn.Module], str]] = [
        ("heads-not-dividing", lambda: MAB(3, 5, 16, 3), "num_heads"),
        ("heads-zero", lambda: MAB(3, 5, 16, 0), "num_heads"),
        ("heads-negative", lambda: MAB(3, 5, 16, -4), "num_heads"),
        ("dim-zero", lambda: MAB(3, 5, 0, 4), "dim"),
        ("ff-dim-zero", lambda: MAB(3, 5, 16, 4, ff_dim=0), "ff_dim"),
        ("norm-unknown", lambda: MAB(3, 5, 16, 4, norm="layer"), "norm"),  # type: ignore[arg-type]
        ("norm-true", lambda: MAB(3, 5, 16, 4, norm=True), "norm"),  # type: ignore[arg-type]
        ("residual-unknown", lambda: MAB(3, 5, 16, 4, residual="query"), "residual"),  # type: ignore[arg-type]
        ("residual-input-width", lambda: MAB(3, 5, 16, 4, residual="input"), "residual"),
        ("dropout-negative", lambda: MAB(3, 5, 16, 4, dropout=-0.1), "dropout"),
        ("dropout-one", lambda: MAB(3, 5, 16, 4, dropout=1.0), "dropout"),
        ("sab-heads", lambda: SAB(5, 16, 5), "num_heads"),
        ("isab-inducing-zero", lambda: ISAB(5, 16, 4, 0), "num_inducing"),
        ("isab-inducing-negative", lambda: ISAB(5, 16, 4, -2), "num_inducing"),
        ("isab-dropout", lambda: ISAB(5, 16, 4, 3, dropout=2.0), "dropout"),
        ("pma-seeds-zero", lambda: PMA(16, 4, 0), "num_seeds"),
        ("pma-norm", lambda: PMA(16, 4, 1, norm="batch"), "norm"),  # type: ignore[arg-type]
    ]
    st: list[tuple[str, dict[str, Any], str]] = [
        ("dim-input", {"dim_input": 0}, "dim_input"),
        ("num-outputs", {"num_outputs": 0}, "num_outputs"),
        ("dim-output", {"dim_output": -1}, "dim_output"),
        ("dim-hidden", {"dim_hidden": 0}, "dim_hidden"),
        ("heads", {"num_heads": 3}, "num_heads"),
        ("inducing", {"num_inducing": 0}, "num_inducing"),
        ("encoder", {"encoder": "cnn"}, "encoder"),
        ("pooling", {"pooling": "attention"}, "pooling"),
        ("norm", {"norm": "batch"}, "norm"),
        ("dropout", {"dropout": 1.5}, "dropout"),
        ("rff-dropout", {"encoder": "rff", "dropout": 1.5}, "dropout"),
        ("decoder-dropout", {"decoder_dropout": 1.5}, "decoder_dropout"),
        ("encoder-layers", {"num_encoder_layers": -1}, "num_encoder_layers"),
        ("decoder-layers", {"num_decoder_layers": -1}, "num_decoder_layers"),
    ]
    base = {"dim_input": 3, "num_outputs": 2, "dim_output": 1, "dim_hidden": 16}
    for name, kw, arg in st:
        c.append((f"st-{name}", lambda kw=kw: SetTransformer(**{**base, **kw}), arg))
    ds: list[tuple[str, dict[str, Any], str]] = [
        ("dim-input", {"dim_input": 0}, "dim_input"),
        ("num-outputs", {"num_outputs": 0}, "num_outputs"),
        ("dim-hidden", {"dim_hidden": 0}, "dim_hidden"),
        ("pool", {"pool": "median"}, "pool"),
        ("dropout", {"dropout": 1.5}, "dropout"),
        ("encoder-layers", {"num_encoder_layers": -1}, "num_encoder_layers"),
    ]
    base = {"dim_input": 3, "num_outputs": 2, "dim_output": 1}
    for name, kw, arg in ds:
        c.append((f"ds-{name}", lambda kw=kw: DeepSets(**{**base, **kw}), arg))
    return c


BAD = _bad_constructors()


@pytest.mark.parametrize(("make", "arg"), [(m, a) for _, m, a in BAD], ids=[i for i, _, _ in BAD])
def test_bad_constructor_arguments(make: Callable[[], nn.Module], arg: str) -> None:
    # "name: ..." (or "name=value ..."), not torch's own message from deep inside a layer
    with pytest.raises(ValueError, match=f"^{arg}[:=]"):
        make()


def test_masked_pool_unknown_kind() -> None:
    with pytest.raises(ValueError, match=expect("how", "'mean', 'sum' or 'max'", "'median'")):
        masked_pool(torch.zeros(2, 3, 4), None, "median")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the helpers themselves


def test_check_set_returns_its_input() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert check_set(x, 4) is x
    assert check_mask(None, x) is None
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert check_mask(mask, x) is mask


def test_check_set_uses_the_given_name() -> None:
    with pytest.raises(ValueError, match=expect("points", "(B, N, 4)")):
        check_set(torch.zeros(2, 3, 5), 4, "points")
    with pytest.raises(TypeError, match=expect("valid", "bool")):
        check_mask(torch.zeros(2, 3), torch.zeros(2, 3, 4), "valid")


def test_zero_padding_replaces_nan_and_inf() -> None:
    x = torch.tensor([[[1.0], [float("nan")], [float("inf")]]], requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    out = zero_padding(x, mask)
    assert out.tolist() == [[[1.0], [0.0], [0.0]]]
    out.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [[[1.0], [0.0], [0.0]]]
    assert zero_padding(x, None) is x


# ---------------------------------------------------------------- finiteness, dtype, device, empty input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_real_element(target, bad: float) -> None:
    forward, name, dim = target
    x, mask = torch.randn(B, N, dim), torch.ones(B, N, dtype=torch.bool)
    x[1, 4, 0] = bad
    with pytest.raises(ValueError, match=expect(name, "finite", f"{name}[1, 4]", "set_finite_checks(False)")):
        forward(x, mask)
    mask[1, 4] = False  # the same value at a padded position is ignored
    assert torch.isfinite(forward(x, mask)).all()


def test_finite_check_opt_out(target) -> None:
    from settransformer.nn import validation

    forward, _, dim = target
    x = torch.randn(B, N, dim)
    x[0, 0, 0] = float("nan")
    assert validation.finite_checks_enabled()
    with validation.finite_checks(False):
        assert not validation.finite_checks_enabled()
        forward(x)  # no check: NaN flows into the output
    assert validation.finite_checks_enabled()
    validation.set_finite_checks(False)
    try:
        forward(x)
    finally:
        validation.set_finite_checks(True)
    with pytest.raises(TypeError, match=r"^enabled:"):
        validation.set_finite_checks("no")  # type: ignore[arg-type]


def test_finite_check_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from settransformer.nn import validation

    try:
        monkeypatch.setenv("SETTRANSFORMER_CHECK_FINITE", "0")
        assert not importlib.reload(validation).finite_checks_enabled()
    finally:
        monkeypatch.delenv("SETTRANSFORMER_CHECK_FINITE")
        assert importlib.reload(validation).finite_checks_enabled()


def test_large_finite_input_passes() -> None:
    # the fast path's sum overflows to inf; the exact test must still accept the input
    x = torch.full((1, 4, 5), 3e38)
    assert check_finite(x) is x
    x16 = torch.full((1, 4, 5), 6e4, dtype=torch.float16)
    assert check_finite(x16) is x16


def test_a_blocks_untouched_output_is_read_once() -> None:
    """Blocks chained by hand check a set's values once, as a model does: another block's output is
    not read again, but a copy of it, or the output changed in place, or one made under
    ``inference_mode`` (no version counter) is."""
    torch.manual_seed(0)
    first, second = SAB(5, 16, 4), SAB(16, 16, 4)
    mab, pma = MAB(16, 16, 16, 4), PMA(16, 4, 2)
    with torch.no_grad():
        first.mab.ff[0].bias.fill_(float("nan"))  # diverged weights: NaN out of checked input
    x, mask = torch.randn(B, N, 5), torch.ones(B, N, dtype=torch.bool)
    h = first(x)
    assert not torch.isfinite(h).any()
    for forward in (lambda t: second(t), lambda t: second(t, mask), lambda t: pma(t), lambda t: mab(t, t)):
        forward(h)  # not read again (mask or not, as keys or as queries)
        with pytest.raises(ValueError, match="expected finite values"):
            forward(h.clone())
    with torch.no_grad():
        first.mab.ff[0].bias.zero_()
    h = first(x)
    second(h)
    h[0, 0, 0] = float("nan")  # a new version of the same tensor
    with pytest.raises(ValueError, match=r"x\[0, 0\]"):
        second(h)
    with torch.inference_mode():
        h = first(x)
        h[0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="expected finite values"):
            second(h)


def test_dtype_must_match_the_module(target) -> None:
    forward, name, dim = target
    with pytest.raises(TypeError, match=expect(name, "torch.float32", "torch.float64", ".to(")):
        forward(torch.randn(B, N, dim, dtype=torch.float64))


def test_autocast_skips_the_dtype_check() -> None:
    sab = SAB(5, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sab(torch.randn(B, N, 5, dtype=torch.bfloat16)).shape == (B, N, 16)


def test_device_must_match_the_module(target) -> None:
    forward, name, dim = target
    with pytest.raises(ValueError, match=expect(name, "meta", "cpu")):
        forward(torch.randn(B, N, dim, device="meta"))


@pytest.mark.parametrize(("b", "n"), [(0, N), (B, 0), (0, 0)], ids=["B=0", "N=0", "both"])
def test_empty_batches_and_sets(target, b: int, n: int) -> None:
    forward, name, dim = target
    if name == "kv" and b == 0:
        pytest.skip("the MAB target's queries have batch size 2")
    out = forward(torch.randn(b, n, dim), torch.zeros(b, n, dtype=torch.bool))
    assert out.shape[0] == b and torch.isfinite(out).all()


def test_chunked_forward_of_empty_sets() -> None:
    model = SetTransformer(5, 2, 3, dim_hidden=16, num_inducing=4).eval()
    x, mask = torch.randn(B, 0, 5), torch.zeros(B, 0, dtype=torch.bool)
    torch.testing.assert_close(model(x, mask, chunk_size=8), model(x, mask))
    with pytest.raises(ValueError, match=r"^chunk_size:"):
        model(x, mask, chunk_size=0)


def test_rff_encoder_without_layers_needs_matching_width() -> None:
    with pytest.raises(ValueError, match=expect("num_encoder_layers", "dim_input == dim_hidden", "3 and 16")):
        SetTransformer(3, 1, 1, dim_hidden=16, encoder="rff", num_encoder_layers=0)
    model = SetTransformer(16, 1, 1, dim_hidden=16, encoder="rff", num_encoder_layers=0)
    assert model(torch.randn(2, 3, 16)).shape == (2, 1, 1)


def test_block_scale_argument() -> None:
    for bad in (0, -1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"^scale:"):
            MAB(3, 5, 16, 4, scale=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- attention() and pad_sets()


def test_attention_argument_checks() -> None:
    from settransformer.nn.attention import attention

    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=expect("q", "(B, H, N, D)", "(4, 3, 8)")):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=expect("q", "(2 or 1, 4, Nq, D)")):
        attention(torch.randn(3, 4, 3, 8), k, v)
    with pytest.raises(ValueError, match=expect("q", "8 features per head")):
        attention(torch.randn(2, 4, 3, 7), k, v)
    with pytest.raises(ValueError, match=expect("v", "(2, 4, 5, Dv)")):
        attention(q, k, v[:, :, :4])
    with pytest.raises(TypeError, match=expect("k", "floating-point", "torch.int64")):
        attention(q, k.long(), v)
    with pytest.raises(TypeError, match=expect("q, k, v", "one dtype")):
        attention(q.double(), k, v)
    with pytest.raises(TypeError, match=expect("mask", "bool", "(2, 5)", "mask.bool()")):
        attention(q, k, v, mask.long())
    with pytest.raises(ValueError, match=expect("mask", "(2, 5)", "got shape (2, 4)")):
        attention(q, k, v, mask[:, :4])
    with pytest.raises(ValueError, match=r"^dropout_p:"):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"^top_k:"):
        attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match=r"^scale: expected a positive number"):
        attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match=r"^score: expected None or a callable .*make_score\('gaussian'"):
        attention(q, k, v, score="gaussian")  # type: ignore[arg-type]


def test_block_options_refuse_a_non_boolean_out_proj() -> None:
    with pytest.raises(TypeError, match=r"^out_proj: expected True or False, got 'no'"):
        SAB(3, 8, 2, out_proj="no")  # type: ignore[arg-type]


def test_attention_ignores_padded_keys_and_values() -> None:
    from settransformer.nn.attention import attention

    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 6)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    out = attention(q, k, v, mask)
    k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    v[~mask[:, None, :, None].expand_as(v)] = float("inf")
    assert torch.equal(attention(q, k, v, mask), out)
    assert (out[1] == 0).all()  # the empty set


def test_pad_sets_argument_checks() -> None:
    from settransformer.nn.sets import pad_sets

    with pytest.raises(TypeError, match=r"^sets:"):
        pad_sets(torch.randn(2, 3) for _ in range(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_size:"):
        pad_sets([torch.randn(2, 3)], max_size="4")  # type: ignore[arg-type]


def test_torch_func_transforms_run_with_the_finite_check_on() -> None:
    """``vmap`` (per-sample outputs) and ``vmap(grad(...))`` (per-sample gradients) cannot read values
    with ``.item()``; the check stands aside for their tensors and the results match a loop."""
    from torch.func import functional_call, grad, vmap

    from settransformer import SetTransformer
    from settransformer.nn.validation import finite_checks

    torch.manual_seed(0)
    model = SetTransformer(3, 1, 1, dim_hidden=8, num_heads=2, num_inducing=2).eval()
    x = torch.randn(3, 5, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).sum()

    with finite_checks(True):
        out = vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        with pytest.raises(ValueError, match="finite"):
            model(torch.full((1, 2, 3), float("nan")))  # outside a transform the check still reads
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    for i in range(3):
        expected = torch.autograd.grad(loss(dict(model.named_parameters()), x[i]), list(model.parameters()))
        for name, g in zip(params, expected):
            torch.testing.assert_close(per_sample[name][i], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_vmap_without_autograd_takes_the_plain_path(mode: str) -> None:
    """Without autograd the blocks' inference paths write into buffers (``out=``), for which ``vmap``
    has no rule; under ``vmap`` they take the plain path, and the result matches a loop."""
    from torch.func import vmap

    from settransformer import SAB, SetTransformer

    torch.manual_seed(1)
    models = [
        SetTransformer(3, 1, 1, dim_hidden=16, num_heads=2, num_inducing=4).eval(),  # ISAB rows
        SAB(3, 64, 4).eval(),  # 128 sets x 4 heads of 10: the explicit kernel for many small heads
    ]
    x = torch.randn(2, 128, 10, 3)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
    for model in models:
        if mode == "frozen":
            model.requires_grad_(False)
        with context() if context is not None else contextlib.nullcontext():
            out = vmap(model)(x)
            expected = torch.stack([model(xi) for xi in x])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
