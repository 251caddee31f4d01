"""``settransformer.nn.models``: SetTransformer and DeepSets.

Permutation invariance, masking (padding is invisible, empty sets are finite), agreement with the
float64 reference in ``reference.py``, gradients, and bfloat16.
"""

from __future__ import annotations

from typing import Any

import pytest
import reference as ref
import torch
from torch import nn

from settransformer.nn.models import DeepSets, SetTransformer
from settransformer.nn.sets import pad_sets

DIM_INPUT, NUM_OUTPUTS, DIM_OUTPUT = 3, 2, 5
SMALL = {"dim_hidden": 16, "num_heads": 4, "num_inducing": 4}

ST_OPTIONS: list[dict[str, Any]] = [
    {},
    {"norm": "pre"},
    {"norm": None},
    {"ff_dim": 24},
    {"num_inducing": None},
    {"num_inducing": None, "norm": "pre", "ff_dim": 8},
    {"encoder": "rff"},
    {"pooling": "mean"},
    {"pooling": "sum"},
    {"pooling": "max"},
    {"pooling": "max", "norm": "pre", "num_inducing": None},
    {"out_proj": False, "residual": "projected", "scale": 0.25},
    {"residual": "projected"},
    {"num_encoder_layers": 3, "num_decoder_layers": 1, "dropout": 0.2, "decoder_dropout": 0.2},
]
DS_OPTIONS: list[dict[str, Any]] = [{"pool": "mean"}, {"pool": "sum"}, {"pool": "max"}]
CASES = [("st", o) for o in ST_OPTIONS] + [("ds", o) for o in DS_OPTIONS]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    kind, opt = case
    return kind + ("-" + "-".join(f"{k}={v}" for k, v in opt.items()) if opt else "")


def build(kind: str, opt: dict[str, Any]) -> nn.Module:
    """A small model in evaluation mode (dropout off)."""
    if kind == "st":
        model: nn.Module = SetTransformer(DIM_INPUT, NUM_OUTPUTS, DIM_OUTPUT, **{**SMALL, **opt})
    else:
        model = DeepSets(DIM_INPUT, NUM_OUTPUTS, DIM_OUTPUT, dim_hidden=16, **opt)
    return model.eval()


def full_kwargs(kind: str, opt: dict[str, Any]) -> dict[str, Any]:
    return {**SMALL, **opt} if kind == "st" else {"dim_hidden": 16, **opt}


@pytest.mark.parametrize("use_mask", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_permutation_invariance(case: tuple[str, dict[str, Any]], use_mask: bool, padded, permute) -> None:
    model = build(*case)
    x, mask, _ = padded([7, 3, 1, 6], DIM_INPUT, n=7)
    mask_or_none = mask if use_mask else None
    out = model(x, mask_or_none)
    assert out.shape == (4, NUM_OUTPUTS, DIM_OUTPUT)
    for _ in range(2):
        xp, mp, _ = permute(x, mask_or_none)
        torch.testing.assert_close(model(xp, mp), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_reference(case: tuple[str, dict[str, Any]], padded) -> None:
    """A padded float64 batch (padding in the middle, an empty set, one larger set) equals the
    reference run on each set alone, to 1e-10."""
    kind, opt = case
    model = build(kind, opt).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    x, mask, sets = padded([5, 0, 2, 30], DIM_INPUT, n=33, dtype=torch.float64)
    out = model(x, mask)
    reference = ref.set_transformer if kind == "st" else ref.deep_sets
    for i, s in enumerate(sets):
        torch.testing.assert_close(
            out[i], reference(model, s, **full_kwargs(kind, opt)), atol=1e-10, rtol=1e-10
        )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_batch_equals_each_set_alone(case: tuple[str, dict[str, Any]], padded) -> None:
    model = build(*case)
    x, mask, sets = padded([6, 2, 9, 1], DIM_INPUT, n=11)
    out = model(x, mask)
    for i, s in enumerate(sets):
        torch.testing.assert_close(out[i], model(s[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("junk", [1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_values_change_nothing(case: tuple[str, dict[str, Any]], junk: float, padded) -> None:
    model = build(*case)
    x, mask, _ = padded([6, 2, 0], DIM_INPUT, n=7)
    out = model(x, mask)
    out_junk = model(x.masked_fill(~mask[..., None], junk), mask)
    assert torch.isfinite(out_junk).all()
    torch.testing.assert_close(out_junk, out, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padding_gets_no_gradient_and_empty_sets_are_finite(case: tuple[str, dict[str, Any]], padded) -> None:
    """Padded inputs get exactly zero gradient; an all-padding set gives a finite output and finite
    gradients for every parameter; element embeddings are exactly zero at padded positions."""
    model = build(*case)
    x, mask, _ = padded([6, 0, 3], DIM_INPUT, n=7)
    x.requires_grad_()
    out = model(x, mask)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None
    assert (x.grad[~mask] == 0).all()
    assert (x.grad[mask] != 0).any()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    z = model.encode(x.detach().masked_fill(~mask[..., None], 0.0), mask)
    assert (z[~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_batch_of_only_empty_sets(case: tuple[str, dict[str, Any]]) -> None:
    """``pad_sets`` of empty sets gives ``(B, 0, D)``; the models must accept it (every set empty)."""
    model = build(*case)
    x, mask = pad_sets([torch.zeros(0, DIM_INPUT)] * 2)
    out = model(x, mask)
    assert out.shape == (2, NUM_OUTPUTS, DIM_OUTPUT)
    assert torch.isfinite(out).all()
    one = model(torch.randn(2, 4, DIM_INPUT), torch.zeros(2, 4, dtype=torch.bool))
    torch.testing.assert_close(out, one, atol=1e-6, rtol=1e-5)


def test_dropout_is_off_in_eval_mode() -> None:
    model = SetTransformer(DIM_INPUT, 1, 1, **SMALL, dropout=0.3, decoder_dropout=0.3)
    x = torch.randn(2, 8, DIM_INPUT)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    ("make", "decoder"),
    [
        (lambda p: SetTransformer(3, 1, 2, dim_hidden=16, num_inducing=4, pooling="max", decoder_dropout=p),
         lambda m: m.decoder[0]),
        (lambda p: DeepSets(3, 1, 2, dim_hidden=16, pool="max", dropout=p), lambda m: m.rho[0]),
    ],
    ids=["set-transformer", "deepsets"],
)  # fmt: skip
def test_pooling_decoders_drop_out_after_the_max(make, decoder) -> None:
    """The paper's pooling decoder is "max-pool, Dropout, FC": what reaches the FC in training is the
    evaluation's pooled vector with some entries zeroed and the rest scaled by 1 / (1 - p). Dropout
    before the max would raise every pooled value about 1 / (1 - p)-fold instead."""
    torch.manual_seed(0)
    p, model, seen = 0.5, make(0.5), []
    decoder(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    x = torch.randn(4, 30, 3)
    model.eval()(x)
    model.train()(x)
    pooled, dropped = seen
    kept = dropped != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(dropped[kept], pooled[kept] / (1 - p))


@pytest.mark.parametrize("case", CASES[:1] + CASES[-1:], ids=case_id)
def test_config_rebuilds_the_model(case: tuple[str, dict[str, Any]]) -> None:
    model = build(*case)
    again = type(model)(**model.config)
    again.load_state_dict(model.state_dict())  # strict: same parameter names and shapes
    x = torch.randn(2, 5, DIM_INPUT)
    torch.testing.assert_close(again.eval()(x), model(x))


@pytest.mark.parametrize(
    "opt", [{}, {"norm": "pre", "num_inducing": None}, {"pooling": "max"}], ids=["isab", "sab-pre", "max"]
)
def test_gradcheck_tiny_set_transformer(opt: dict[str, Any]) -> None:
    """float64 gradcheck w.r.t. the input (full) and every parameter (gradcheck's fast mode), with a
    padded batch holding an empty set."""
    opt = {"dim_hidden": 4, "num_heads": 2, "num_inducing": 2, "num_decoder_layers": 1, **opt}
    model = SetTransformer(2, 2, 2, **opt)
    model = model.double().eval()
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x, mask))

    assert torch.autograd.gradcheck(lambda x: f(x, *params), (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(f, (x.detach(), *params), fast_mode=True)


# ---------------------------------------------------------------- bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("opt", [{}, {"norm": "pre"}], ids=["post", "pre"])
def test_bfloat16_autocast(opt: dict[str, Any], padded) -> None:
    """Forward and backward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` run and are finite;
    the output is within a relative error (Frobenius norm) of 5e-2 of float32 — bfloat16 keeps 8
    mantissa bits (~4e-3 per rounding), so a few layers of rounding stay well inside 5e-2 (measured:
    about 5e-3) while a wrong result (e.g. masking lost in the cast) does not."""
    model = SetTransformer(DIM_INPUT, NUM_OUTPUTS, DIM_OUTPUT, dim_hidden=32, num_inducing=8, **opt).eval()
    x, mask, _ = padded([40, 13, 0, 25], DIM_INPUT, n=40)
    x.requires_grad_()
    expected = model(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 5e-2
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "case", [("st", {}), ("st", {"pooling": "max"}), ("ds", {"pool": "max"})], ids=case_id
)
def test_model_converted_to_bfloat16(case: tuple[str, dict[str, Any]], padded) -> None:
    """``model.to(torch.bfloat16)`` on bfloat16 input: runs, finite, and within the same 5e-2 relative
    error of float32 as under autocast (measured: about 5e-3)."""
    model = build(*case)
    x, mask, _ = padded([20, 7, 0], DIM_INPUT, n=20)
    expected = model(x, mask)
    out = model.to(torch.bfloat16)(x.to(torch.bfloat16), mask)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 5e-2


def test_state_dict_keys_of_checkpoints_written_before_stay_loadable() -> None:
    """Parameter names are the checkpoint format: a state dict with the established keys loads."""
    model = SetTransformer(
        2, 1, 1, dim_hidden=8, num_heads=2, num_inducing=2, num_encoder_layers=1, num_decoder_layers=1
    )
    keys = set(model.state_dict())
    for key in (
        "encoder.0.inducing",
        "encoder.0.mab0.to_q.weight",
        "encoder.0.mab1.to_kv.weight",
        "encoder.0.mab0.norm1.weight",
        "pma.seeds",
        "pma.mab.to_kv.weight",
        "pma.mab.to_out.bias",
        "decoder.0.mab.ff.0.weight",
        "head.weight",
    ):
        assert key in keys
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["pma.mab.to_kv.weight"], state["pma.mab.to_kv.weight"])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: DeepSets(
            DIM_INPUT, 2, 3, dim_hidden=8, num_encoder_layers=2, num_decoder_layers=3, dropout=p
        ),
        lambda p: SetTransformer(
            DIM_INPUT,
            2,
            3,
            dim_hidden=8,
            num_heads=2,
            encoder="rff",
            num_encoder_layers=3,
            pooling="mean",
            num_decoder_layers=2,
            dropout=p,
            decoder_dropout=p,
        ),
    ],
    ids=["deepsets", "rff-mean"],
)
def test_weights_trained_with_dropout_load_without_it(make) -> None:
    """The row-wise MLPs' state dict does not depend on the dropout rate, and one saved with a
    Dropout module after each ReLU (Linear i at index 3 i) is renumbered as it loads."""
    trained = make(0.3)
    assert list(trained.state_dict()) == list(make(0.0).state_dict())
    x = torch.randn(2, 5, DIM_INPUT)
    model = make(0.0).eval()
    model.load_state_dict(trained.state_dict())
    torch.testing.assert_close(model(x), trained.eval()(x))
    trained.train()
    assert not torch.allclose(trained(x), trained(x))  # the dropout still acts in training

    def dropout_layout(key: str) -> str:  # phi.2.weight -> phi.3.weight, rho.0.4.bias -> rho.0.6.bias
        parts = key.split(".")
        for i in range(len(parts) - 2, 0, -1):
            if parts[i].isdigit():
                parts[i] = str(int(parts[i]) // 2 * 3)
                break
        return ".".join(parts)

    mlp_prefixes = ("phi.", "rho.0.", "encoder.0.", "decoder.0.")
    old = {
        dropout_layout(k) if k.startswith(mlp_prefixes) else k: v + 1 for k, v in trained.state_dict().items()
    }
    assert set(old) != set(trained.state_dict())  # the old layout really differs
    fresh = make(0.0)
    fresh.load_state_dict(old)  # strict
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[key] + 1)
