"""The three exact forms of a MAB's attention (standard, pooled, induced) agree.

MAB picks the cheapest form by counting multiply-adds; each must compute the same function,
including masks, empty sets and every normalisation/residual option.
"""

import importlib

import pytest
import torch

from settransformer.nn.attention import FormSizes, cheapest_form, induced_is_cheaper
from settransformer.nn.blocks import ISAB
from settransformer.nn.mab import MAB

PATHS = ("standard", "pooled", "induced")


@pytest.mark.parametrize("norm", ["post", "pre", None])
@pytest.mark.parametrize("residual", ["auto", "projected"])
@pytest.mark.parametrize(("dim_q", "dim_kv"), [(16, 16), (3, 16), (16, 2)])
@pytest.mark.parametrize(("nq", "nk"), [(2, 40), (40, 2), (7, 9)])
def test_paths_agree(norm, residual, dim_q, dim_kv, nq, nk):
    torch.manual_seed(0)
    mab = MAB(dim_q, dim_kv, 16, 4, norm=norm, residual=residual).double()
    q = torch.randn(3, nq, dim_q, dtype=torch.float64)
    kv = torch.randn(3, nk, dim_kv, dtype=torch.float64)
    mask = torch.rand(3, nk) > 0.3
    mask[0, 0] = True
    mask[1] = False  # an empty set
    kv = kv.masked_fill(~mask[..., None], 0.0)
    outputs = {}
    for path in PATHS:
        mab.form = path
        outputs[path] = mab.forward_unchecked(q, kv, mask)
    for path in PATHS[1:]:
        torch.testing.assert_close(outputs[path], outputs["standard"], rtol=0, atol=1e-10)


def test_path_choice_follows_shape():
    mab = MAB(128, 128, 128, 4)
    assert mab.choose_form(4, 10_000) == "pooled"  # PMA seeds over a large set
    assert mab.choose_form(10_000, 32) == "induced"  # a set attending to 32 inducing points
    assert mab.choose_form(1_000, 1_000) == "standard"  # self-attention
    assert MAB(128, 128, 128, 4, out_proj=False).choose_form(10_000, 32) != "induced"  # needs W^O to fold


def test_path_choice_on_a_gpu_is_the_standard_form_unless_pinned():
    mab = MAB(128, 128, 128, 4)
    assert mab.choose_form(4, 10_000, "cuda") == "standard"
    assert mab.choose_form(10_000, 32, "cuda") == "standard"
    mab.form = "pooled"
    assert mab.choose_form(4, 10_000, "cuda") == "pooled"


def test_paths_agree_in_gradient():
    torch.manual_seed(1)
    mab = MAB(8, 8, 8, 2).double()
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    kv = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    kv = kv.masked_fill(~mask[..., None], 0.0)
    grads = {}
    for path in PATHS:
        mab.form = path
        mab.zero_grad()
        mab.forward_unchecked(q, kv, mask).square().sum().backward()
        grads[path] = torch.cat([p.grad.flatten() for p in mab.parameters() if p.grad is not None])
    for path in PATHS[1:]:
        torch.testing.assert_close(grads[path], grads["standard"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("nk", [0, 5, 300])
def test_pooled_attention_is_the_same_on_either_kernel(nk, monkeypatch):
    """Values and gradients of the pooled form on the explicit and the fused kernel; masks and
    empty sets included."""
    attention = importlib.import_module("settransformer.nn.attention")  # `attention` is also a function

    torch.manual_seed(0)
    q = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(3, nk, 6, dtype=torch.float64, requires_grad=True)
    w_k, w_v = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    b_v = torch.randn(8, dtype=torch.float64)
    mask = torch.rand(3, nk) < 0.7
    mask[1] = False  # an empty set

    def run(kernel: str) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(attention, "choose_kernel", lambda q, k, v: kernel)
        kv_in = kv.masked_fill(~mask[..., None], 0.0)  # the blocks zero padded rows first
        out = attention.pooled_attention(q, kv_in, w_k, w_v, b_v, 2, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, kv))
        return (out, *grads)

    explicit, fused = run("explicit"), run("fused")
    for a, b in zip(explicit, fused):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert explicit[0][1].abs().max() == 0  # the empty set's attention output is zero


def test_cheapest_form_for_the_set_transformer_shapes() -> None:
    sizes = FormSizes(dim=128, num_heads=4, dim_q=128, dim_kv=128, projected_residual=False, out_proj=True)
    assert cheapest_form(32, 10_000, sizes) == "pooled"  # inducing points over a set
    assert cheapest_form(10_000, 32, sizes) == "induced"  # a set over its induced vectors
    assert cheapest_form(500, 500, sizes) == "standard"  # SAB
    assert cheapest_form(32, float("inf"), sizes) == "pooled"  # type: ignore[arg-type]  # symbolic: large
    assert cheapest_form(0, 32, sizes) == "standard"
    assert induced_is_cheaper(32, sizes) and not induced_is_cheaper(64, sizes)
    # without W^O there is nothing to fold the values into
    assert not induced_is_cheaper(1, sizes._replace(out_proj=False))


def test_rewrites_need_a_large_side_of_rewrite_min_set() -> None:
    from settransformer.nn.attention import REWRITE_MIN_SET

    sizes = FormSizes(dim=64, num_heads=4, dim_q=64, dim_kv=64, projected_residual=False, out_proj=True)
    few, enough = REWRITE_MIN_SET - 1, REWRITE_MIN_SET
    assert cheapest_form(1, few, sizes) == "standard" and cheapest_form(1, enough, sizes) == "pooled"
    assert cheapest_form(few, 4, sizes) == "standard" and cheapest_form(enough, 4, sizes) == "induced"


# (Nq, Nk, Dh): the temperature on the queries, on the keys, on the scores (the smallest of each)
@pytest.mark.parametrize(("nq", "nk", "dh"), [(5, 7, 4), (7, 5, 4), (2, 3, 8)])
@pytest.mark.parametrize("kind", ["plain", "masked", "bias"])
def test_explicit_kernel_agrees_with_fused(kind, nq, nk, dh):
    """Batched products + softmax compute what the fused kernel does: masks, empty sets, a
    per-key bias (the dot-product scores' ``as_dot``), values and gradients, in float64."""
    from settransformer.nn.attention import attention
    from settransformer.nn.scores import make_score

    torch.manual_seed(2)
    q = torch.randn(3, 2, nq, dh, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, nk, dh, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, nk, 6, dtype=torch.float64, requires_grad=True)
    mask = None
    if kind != "plain":
        mask = torch.rand(3, nk) > 0.4
        mask[0, 0] = True
        mask[1] = False  # an empty set: exactly zero, finite gradients
    score = make_score("gaussian", 2, dh) if kind == "bias" else None
    if score is not None:
        score = score.double()
    results = {}
    for kernel in ("fused", "explicit"):
        out = attention(q, k, v, mask, kernel=kernel, score=score)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results[kernel] = (out, *grads)
    for fused, explicit in zip(results["fused"], results["explicit"]):
        torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-10)
    if mask is not None:
        assert results["explicit"][0][1].abs().max() == 0


def test_explicit_kernel_dropout_is_deterministic_given_the_seed():
    from settransformer.nn.attention import attention

    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(attention(q, k, k, dropout_p=0.5, kernel="explicit"))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], attention(q, k, k, kernel="explicit"))


def test_kernel_rule_follows_shape_and_autograd():
    from settransformer.nn.attention import EXPLICIT_MAX_SCORES, attention, choose_kernel

    tiny = torch.randn(32, 4, 10, 16)  # a SAB over 10 elements: the fused kernel's one call wins
    rows, inducing = torch.randn(10, 4, 450, 32), torch.randn(10, 4, 32, 32)  # a set over inducing points
    stacked, one_set = torch.randn(1, 1, 128, 128), torch.randn(1, 1, 10_000, 128)  # pooled form, B = 1
    assert choose_kernel(tiny, tiny, tiny) == "fused"
    assert choose_kernel(rows, inducing, inducing) == "explicit"
    assert choose_kernel(rows, rows, rows) == "fused"  # 10 * 4 * 450 ** 2 scores: too many to store
    assert 10 * 4 * 450 * 32 <= EXPLICIT_MAX_SCORES < 10 * 4 * 450**2
    with torch.no_grad():
        assert choose_kernel(stacked, one_set, one_set) == "fused"  # one (batch, head): fused splits it
    assert choose_kernel(stacked.requires_grad_(), one_set, one_set) == "explicit"  # its backward does not
    large_set = torch.randn(1, 1, 100_000, 128)  # 128 x 100k scores: over the limit, no more than the keys
    assert EXPLICIT_MAX_SCORES < 128 * 100_000
    assert choose_kernel(stacked, large_set, large_set) == "explicit"
    assert choose_kernel(rows.requires_grad_(), rows, rows) == "fused"  # N x N scores stay fused
    seeds, z = torch.randn(1, 1, 16, 128, requires_grad=True), torch.randn(10, 1, 450, 128)  # PMA(4), pooled
    assert choose_kernel(seeds.expand(10, -1, -1, -1), z, z) == "fused"  # few queries over many keys
    with torch.no_grad():
        assert choose_kernel(seeds.expand(10, -1, -1, -1), z, z) == "fused"  # with or without autograd
        many_seeds = torch.randn(10, 1, 64, 128)  # PMA(16) stacked: more than FUSED_MAX_QUERIES
        assert choose_kernel(many_seeds, z, z) == "explicit"
    few_keys = torch.randn(128, 1, 10, 64)  # max regression's PMA(1) over 10 elements
    assert choose_kernel(seeds[..., :4, :64].expand(128, -1, -1, -1), few_keys, few_keys) == "explicit"
    with pytest.raises(ValueError, match="kernel"):
        attention(tiny, tiny, tiny, kernel="bmm")


def test_kernel_rule_for_many_small_heads():
    from settransformer.nn.attention import EXPLICIT_MIN_SMALL_SCORES, EXPLICIT_MIN_WORK, choose_kernel
    from settransformer.nn.scores import CPU_VECTOR_BYTES

    many = torch.randn(128, 4, 10, 16)  # max regression's SAB: 512 (batch, head)s of 10 x 10 scores
    few = torch.randn(8, 4, 10, 16)
    seeds = torch.randn(128, 4, 1, 16)  # one query per (batch, head): the fused kernel's cheapest case
    assert EXPLICIT_MIN_WORK > 10 * 10 * 16 and 8 * 4 * 100 < EXPLICIT_MIN_SMALL_SCORES <= 128 * 4 * 100
    with torch.no_grad():
        expected = "explicit" if CPU_VECTOR_BYTES == 64 else "fused"  # calibrated on AVX-512 only
        assert choose_kernel(many, many, many) == expected
        assert choose_kernel(many.double(), many.double(), many.double()) == "fused"  # rows of 80 bytes
        assert choose_kernel(few, few, few) == "fused"
        assert choose_kernel(seeds, many, many) == "fused"
    assert choose_kernel(many.requires_grad_(), many, many) == "fused"  # autograd: no softmax passes


def test_gpu_kernel_rule_spreads_long_walks_over_the_device():
    from settransformer.nn.attention import GPU_EXPLICIT_MIN_SERIAL, _gpu_kernel, choose_kernel

    sms = 132  # an H100 / H200
    # an ISAB at N = 10k, B = 1, 4 heads of 32: its inducing points over the set (4 thread blocks)...
    assert _gpu_kernel(1, 4, 32, 10_000, 32, grad=False, processors=sms) == "explicit"
    # ...the set over the inducing points: thousands of query tiles forward, 4 key tiles backward
    assert _gpu_kernel(1, 4, 10_000, 32, 32, grad=False, processors=sms) == "fused"
    assert _gpu_kernel(1, 4, 10_000, 32, 32, grad=True, processors=sms) == "explicit"
    # short walks keep the fused kernel's one launch: a MoG batch (450 elements), a SAB's N x N
    assert _gpu_kernel(10, 4, 32, 450, 32, grad=True, processors=sms) == "fused"
    assert _gpu_kernel(1, 4, 10_000, 10_000, 32, grad=True, processors=sms) == "fused"  # N x N scores
    # enough (batch, head) pairs fill the device: fused
    assert _gpu_kernel(64, 4, 32, 10_000, 32, grad=False, processors=sms) == "fused"
    assert _gpu_kernel(1, 4, 32, GPU_EXPLICIT_MIN_SERIAL - 1, 32, grad=False, processors=sms) == "fused"
    assert _gpu_kernel(1, 4, 64, 10_000, 32, grad=False, processors=sms) == "fused"  # scores > keys
    meta = torch.empty(1, 4, 32, 32, device="meta")  # neither CPU nor CUDA: the fused kernel
    assert choose_kernel(meta, torch.empty(1, 4, 10_000, 32, device="meta"), meta) == "fused"


def test_standard_form_without_autograd_equals_with():
    """Without autograd a small standard-form MAB takes the explicit kernel; same values."""
    torch.manual_seed(4)
    mab = MAB(16, 16, 16, 4).double()
    mab.form = "standard"
    q, kv = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 9, 16, dtype=torch.float64)
    mask = torch.rand(3, 9) > 0.3
    mask[2] = False
    kv = kv.masked_fill(~mask[..., None], 0.0)
    with_grad = mab.forward_unchecked(q, kv, mask)
    with torch.no_grad():
        without = mab.forward_unchecked(q, kv, mask)
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("training", [False, True])
def test_isab_asks_for_its_form_once_per_call(training, monkeypatch):
    """A pinned sequence of forms advances one place per attention call, also where the ISAB's
    row-by-row path falls back to the block's own (pooled form; dropout in training mode)."""
    mab_module = importlib.import_module("settransformer.nn.mab")
    pooled_calls = []
    pooled = mab_module.pooled_attention

    def counting(*args, **kwargs):
        pooled_calls.append(args[1].shape[1])  # keys per set: the inducing points for mab1
        return pooled(*args, **kwargs)

    monkeypatch.setattr(mab_module, "pooled_attention", counting)
    torch.manual_seed(0)
    isab = ISAB(3, 16, num_heads=4, num_inducing=4, dropout=0.1 if training else 0.0)
    isab.train(training)
    isab.mab0.form = "standard"
    isab.mab1.form = ("pooled", "standard")
    x = torch.randn(2, 30, 3)
    with torch.no_grad():
        isab(x)
        isab(x)
    assert isab.mab1._form_calls == 2
    assert pooled_calls == [4]  # the first call pooled, the second standard
    with mab_module.large_set_forms(isab, (x,), (x[:, :20],), lambda b: isab(*b)):
        assert isab.mab1.form == ("induced",)  # one logged call per forward: one pinned form
