"""Order-aware baselines (JANET, IndRNN, positional Transformer, set wrappers) and permutation sensitivity."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from settransformer import DeepSets, SetTransformer
from settransformer.nn.sequence import (
    JANET,
    IndRNN,
    PositionalTransformer,
    SequenceSetModel,
    SinusoidalPositionalEncoding,
    compact,
)
from settransformer.tasks.metrics import permutation_sensitivity, permute_sets

RNNS = (JANET, IndRNN)
LSTM_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def test_constructor_signature_is_lstms():
    lstm = {n: inspect.signature(nn.LSTM(3, 4).__init__).parameters for n in ["x"]}["x"]
    del lstm  # nn.LSTM takes *args; compare with the documented defaults instead
    for cls in RNNS:
        m = cls(3, 4)
        assert (m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional) == (
            1,
            True,
            False,
            0.0,
            False,
        )
        m = cls(3, 4, 2, False, True, 0.1, True)  # positional, in nn.LSTM's order
        assert (m.input_size, m.hidden_size, m.num_layers, m.bias) == (3, 4, 2, False)
        assert (m.batch_first, m.dropout, m.bidirectional) == (True, 0.1, True)
        assert not any(n.startswith("bias") for n, _ in m.named_parameters())
        assert {"weight_ih_l1_reverse", "weight_hh_l0"} <= {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("cls", RNNS)
def test_shapes_follow_lstm(cls):
    torch.manual_seed(0)
    ref, mine = nn.LSTM(3, 5, 2, bidirectional=True), cls(3, 5, 2, bidirectional=True)
    x = torch.randn(7, 4, 3)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), mine(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape
    bf = cls(3, 5, batch_first=True)
    assert bf(x.transpose(0, 1))[0].shape == (4, 7, 5)
    out, (h, _) = cls(3, 5)(torch.randn(7, 3))  # unbatched
    assert out.shape == (7, 5) and h.shape == (1, 5)
    with pytest.raises(ValueError, match="hx"):
        mine(x, torch.zeros(1, 4, 5))


@pytest.mark.parametrize("cls", RNNS)
def test_packed_sequences_match_separate_runs(cls):
    torch.manual_seed(1)
    m = cls(3, 5, num_layers=2, batch_first=True, bidirectional=True).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h, c) = m(packed)
    assert torch.equal(out.batch_sizes, packed.batch_sizes) and torch.equal(
        out.sorted_indices, packed.sorted_indices
    )
    padded, _ = pad_packed_sequence(out, batch_first=True)
    assert torch.equal(h, c)
    for i, n in enumerate(lengths.tolist()):
        oi, (hi, _) = m(x[i : i + 1, :n])
        torch.testing.assert_close(padded[i, :n], oi[0])
        torch.testing.assert_close(h[:, i], hi[:, 0])
        assert padded[i, n:].abs().sum() == 0


def test_janet_step_is_the_forget_gate_recurrence():
    torch.manual_seed(2)
    m = JANET(2, 3, beta=1.0).double()
    x = torch.randn(2, 1, 2, dtype=torch.float64)
    out, _ = m(x)
    w_ih, w_hh, b = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0
    h = torch.zeros(1, 3, dtype=torch.float64)
    for t in range(2):
        s, c = (x[t] @ w_ih.t() + b + h @ w_hh.t()).chunk(2, -1)
        h = torch.sigmoid(s) * h + (1 - torch.sigmoid(s - 1.0)) * torch.tanh(c)
        torch.testing.assert_close(out[t], h)
    chrono = JANET(2, 50, chrono_t_max=100)
    forget = chrono.bias_ih_l0[:50]
    assert forget.min() >= 0 and forget.max() <= math.log(99) and forget.std() > 0.1
    assert torch.all(JANET(2, 4).bias_ih_l0[:4] == 1.0)


def test_indrnn_step_and_recurrent_clipping():
    torch.manual_seed(3)
    m = IndRNN(2, 3, recurrent_max=0.5).double()
    assert m.weight_hh_l0.shape == (3,) and (m.weight_hh_l0 >= 0).all()
    with torch.no_grad():
        m.weight_hh_l0.copy_(torch.tensor([2.0, -2.0, 0.3]))
    x = torch.randn(3, 1, 2, dtype=torch.float64)
    out, (h, _) = m(x)
    u = torch.tensor([0.5, -0.5, 0.3], dtype=torch.float64)
    state = torch.zeros(1, 3, dtype=torch.float64)
    for t in range(3):
        state = torch.relu(x[t] @ m.weight_ih_l0.t() + m.bias_ih_l0 + u * state)
        torch.testing.assert_close(out[t], state)
    torch.testing.assert_close(h[0], state)
    with pytest.raises(ValueError, match="nonlinearity"):
        IndRNN(2, 3, nonlinearity="gelu")


@pytest.mark.parametrize("cls", RNNS)
def test_layer_dropout_only_in_training_and_gradients_flow(cls):
    m = cls(3, 4, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 3, requires_grad=True)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, m(x)[0])
    a.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sinusoidal_encoding_formula():
    pe = SinusoidalPositionalEncoding.table(7, 5)
    pos, i = 3, 1
    assert math.isclose(pe[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 5)), rel_tol=1e-6)
    assert math.isclose(pe[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 5)), rel_tol=1e-6)
    x = torch.zeros(2, 7, 5)
    torch.testing.assert_close(SinusoidalPositionalEncoding(5)(x), pe.expand(2, 7, 5))


def test_positional_transformer_is_order_aware():
    torch.manual_seed(4)
    model = PositionalTransformer(8, nhead=2, num_layers=1).eval()
    x = torch.randn(2, 6, 8)
    perm = torch.randperm(6)
    y, yp = model(x), model(x[:, perm])
    assert (yp - y[:, perm]).abs().max() > 1e-3  # not merely equivariant


def test_compact_keeps_order():
    x = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    mask = torch.tensor([[False, True, False, True, True, False], [True] * 6])
    xs, lengths = compact(x, mask)
    assert lengths.tolist() == [3, 6]
    assert xs[0, :3, 0].tolist() == [1.0, 3.0, 4.0] and xs[1, :, 0].tolist() == list(range(6))


@pytest.mark.parametrize("kind", ["lstm", "janet", "indrnn", "transformer"])
def test_sequence_set_model(kind, padded):
    torch.manual_seed(5)
    model = SequenceSetModel(2, 3, 4, kind=kind, dim_hidden=8, num_heads=2).eval()
    x, mask, sets = padded([4, 0, 6, 2], 2)
    out = model(x, mask)
    assert out.shape == (4, 3, 4) and torch.isfinite(out).all()
    # padding anywhere is skipped: the same as the real elements alone, in order
    for i, s in enumerate(sets):
        if len(s):
            torch.testing.assert_close(out[i], model(s[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model.head(torch.zeros(1, model.head[0].in_features)).view(3, 4))
    assert permutation_sensitivity(model, x, mask, generator=torch.Generator().manual_seed(0)) > 1e-4


@pytest.mark.parametrize("kind", ["lstm", "janet", "indrnn", "transformer"])
def test_sequence_set_model_checks_its_input_like_the_set_models(kind):
    """NaN padding has no influence, empty batches and sets give the empty set's output, and bad
    input is an error naming ``x``."""
    torch.manual_seed(6)
    model = SequenceSetModel(3, 1, 2, kind=kind, dim_hidden=8, num_heads=2).eval()
    x, mask = torch.randn(2, 4, 3), torch.tensor([[True, True, True, False], [True, True, False, False]])
    clean = model(x, mask)
    torch.testing.assert_close(model(x.masked_fill(~mask[..., None], float("nan")), mask), clean)
    empty = model.head(torch.zeros(1, model.width)).view(1, 2)
    torch.testing.assert_close(model(torch.randn(2, 0, 3)), empty.expand(2, 1, 2))
    assert model(torch.randn(0, 5, 3)).shape == (0, 1, 2)
    with pytest.raises(TypeError, match=r"x: expected dtype torch\.float32"):
        model(x.double(), mask)
    with pytest.raises(ValueError, match="x: expected finite values"):
        model(torch.full((1, 2, 3), float("nan")))


def test_sequence_set_model_rejects_bad_options():
    with pytest.raises(ValueError, match="kind"):
        SequenceSetModel(2, 1, 1, kind="gru")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bidirectional"):
        SequenceSetModel(2, 1, 1, kind="transformer", bidirectional=True)
    assert SequenceSetModel(2, 1, 1, kind="lstm", bidirectional=True, dim_hidden=4)(
        torch.randn(3, 5, 2)
    ).shape == (3, 1, 1)


def test_permutation_sensitivity_separates_set_models(padded):
    torch.manual_seed(6)
    x, mask, _ = padded([5, 9, 1, 7], 2)
    g = torch.Generator().manual_seed(0)
    for model in (DeepSets(2, 1, 1, dim_hidden=16), SetTransformer(2, 2, 1, dim_hidden=16, num_inducing=4)):
        model.train()
        assert permutation_sensitivity(model, x, mask, num_orders=4, generator=g) < 1e-5
        assert model.training  # restored
    assert permutation_sensitivity(lambda x, m: x[:, 0], x, mask, generator=g) > 0.1
    with pytest.raises(ValueError, match="num_orders"):
        permutation_sensitivity(lambda x, m: x, x, mask, num_orders=1)


def test_permute_sets_moves_mask_with_elements(padded):
    x, mask, _ = padded([3, 5], 2)
    xp, mp, perm = permute_sets(x, mask, torch.Generator().manual_seed(0))
    assert torch.equal(xp[mp].sort(0).values, x[mask].sort(0).values)
    assert torch.equal(torch.gather(mask, 1, perm), mp)
