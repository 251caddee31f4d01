"""``settransformer.compat``: loading weights of the official Set Transformer code.

``Official*`` below re-implement, from its description, the semantics and parameter names of the
official ``models.SetTransformer`` (juho-lee/set_transformer), so the tests can produce its state
dicts and outputs without the official code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from settransformer.compat import (
    load_official,
    official_set_transformer,
    to_official_state_dict,
)
from settransformer.nn.models import SetTransformer


class OfficialMAB(nn.Module):
    """Heads split the last dim; softmax scaled by the full width; projected-query residual; no W^O."""

    def __init__(self, dim_q: int, dim_k: int, dim_v: int, num_heads: int, ln: bool = False) -> None:
        super().__init__()
        self.dim_v, self.num_heads = dim_v, num_heads
        self.fc_q, self.fc_k, self.fc_v = (
            nn.Linear(dim_q, dim_v),
            nn.Linear(dim_k, dim_v),
            nn.Linear(dim_k, dim_v),
        )
        if ln:
            self.ln0, self.ln1 = nn.LayerNorm(dim_v), nn.LayerNorm(dim_v)
        self.fc_o = nn.Linear(dim_v, dim_v)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        q, k, v = self.fc_q(x), self.fc_k(y), self.fc_v(y)
        outs = []
        for qh, kh, vh in zip(*(t.chunk(self.num_heads, dim=-1) for t in (q, k, v))):
            weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(self.dim_v), dim=-1)
            outs.append(qh + weights @ vh)
        o = torch.cat(outs, dim=-1)
        if hasattr(self, "ln0"):
            o = self.ln0(o)
        o = o + F.relu(self.fc_o(o))
        return self.ln1(o) if hasattr(self, "ln1") else o


class OfficialSAB(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, num_heads: int, ln: bool = False) -> None:
        super().__init__()
        self.mab = OfficialMAB(dim_in, dim_in, dim_out, num_heads, ln)

    def forward(self, x: Tensor) -> Tensor:
        return self.mab(x, x)


class OfficialISAB(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, num_heads: int, num_inds: int, ln: bool = False) -> None:
        super().__init__()
        self.I = nn.Parameter(torch.randn(1, num_inds, dim_out))
        self.mab0 = OfficialMAB(dim_out, dim_in, dim_out, num_heads, ln)
        self.mab1 = OfficialMAB(dim_in, dim_out, dim_out, num_heads, ln)

    def forward(self, x: Tensor) -> Tensor:
        return self.mab1(x, self.mab0(self.I.expand(x.shape[0], -1, -1), x))


class OfficialPMA(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_seeds: int, ln: bool = False) -> None:
        super().__init__()
        self.S = nn.Parameter(torch.randn(1, num_seeds, dim))
        self.mab = OfficialMAB(dim, dim, dim, num_heads, ln)

    def forward(self, x: Tensor) -> Tensor:
        return self.mab(self.S.expand(x.shape[0], -1, -1), x)


class OfficialSetTransformer(nn.Module):
    """``num_isabs=3`` is the layout of early versions of the official code."""

    def __init__(
        self,
        dim_input: int,
        num_outputs: int,
        dim_output: int,
        num_inds: int = 32,
        dim_hidden: int = 128,
        num_heads: int = 4,
        ln: bool = False,
        num_isabs: int = 2,
    ) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            *(
                OfficialISAB(dim_input if i == 0 else dim_hidden, dim_hidden, num_heads, num_inds, ln)
                for i in range(num_isabs)
            )
        )
        self.dec = nn.Sequential(
            OfficialPMA(dim_hidden, num_heads, num_outputs, ln),
            OfficialSAB(dim_hidden, dim_hidden, num_heads, ln),
            OfficialSAB(dim_hidden, dim_hidden, num_heads, ln),
            nn.Linear(dim_hidden, dim_output),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(self.enc(x))


# (dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads)
SIZES = [(2, 4, 4, 8, 16, 4), (3, 1, 2, 5, 32, 2)]


def official(ln: bool, size: tuple[int, ...], num_isabs: int = 2) -> OfficialSetTransformer:
    dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads = size
    model = OfficialSetTransformer(
        dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads, ln, num_isabs
    )
    with torch.no_grad():  # LayerNorms away from their identity initialisation
        for name, p in model.named_parameters():
            if ".ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def load(state: dict[str, Tensor], ln: bool, size: tuple[int, ...]) -> SetTransformer:
    dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads = size
    return load_official(
        state, dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads, ln
    ).eval()


@pytest.mark.parametrize("size", SIZES, ids=["small", "wider"])
@pytest.mark.parametrize("ln", [False, True], ids=["no-ln", "ln"])
def test_loaded_model_matches_official(ln: bool, size: tuple[int, ...]) -> None:
    ref = official(ln, size)
    ours = load(ref.state_dict(), ln, size)
    for n in (1, 7, 40):
        x = torch.randn(3, n, size[0])
        with torch.no_grad():
            expected = ref(x)
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    # and, beyond the official code, on a padded batch: each set as the official model sees it alone
    sizes = [9, 4, 1]
    x, mask = torch.randn(3, 9, size[0]), torch.arange(9)[None] < torch.tensor(sizes)[:, None]
    with torch.no_grad():
        out = ours(x, mask)
        for i, n in enumerate(sizes):
            torch.testing.assert_close(out[i], ref(x[i : i + 1, :n])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ln", [False, True], ids=["no-ln", "ln"])
def test_paper_options_compute_something_else(ln: bool) -> None:
    """The same weights under our default (paper) semantics give different outputs, so the match
    above depends on the compat options: the per-head softmax scale and the input residual."""
    size = SIZES[0]
    ref = official(ln, size)
    ours = load(ref.state_dict(), ln, size)
    x = torch.randn(2, 20, size[0])
    for override in ({"scale": None}, {"residual": "auto"}):
        options = {**ours.config, **override}
        other = SetTransformer(**options).eval()
        other.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (other(x) - ref(x)).abs().max() > 1e-3, override
    if ln:  # the full default configuration, with W^O = identity so the official weights fit
        dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads = size
        paper = SetTransformer(
            dim_input,
            num_outputs,
            dim_output,
            dim_hidden=dim_hidden,
            num_heads=num_heads,
            num_inducing=num_inds,
        ).eval()
        state = paper.state_dict()
        state.update(ours.state_dict())
        for key in state:
            if key.endswith("to_out.weight"):
                state[key] = torch.eye(dim_hidden)
            elif key.endswith("to_out.bias"):
                state[key] = torch.zeros(dim_hidden)
        paper.load_state_dict(state)
        with torch.no_grad():
            assert (paper(x) - ref(x)).abs().max() > 1e-3


def test_three_isab_encoder_of_early_versions() -> None:
    ref = official(False, SIZES[0], num_isabs=3)
    ours = load(ref.state_dict(), False, SIZES[0])
    assert len(ours.encoder) == 3
    x = torch.randn(2, 11, SIZES[0][0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ln", [False, True], ids=["no-ln", "ln"])
def test_to_official_state_dict_round_trip(ln: bool) -> None:
    size = SIZES[1]
    dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads = size
    ours = official_set_transformer(
        dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads, ln
    ).eval()
    state = to_official_state_dict(ours)
    ref = OfficialSetTransformer(
        dim_input, num_outputs, dim_output, num_inds, dim_hidden, num_heads, ln
    ).eval()
    ref.load_state_dict(state)  # strict: exactly the official keys and shapes
    x = torch.randn(2, 13, dim_input)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=1e-5, rtol=1e-5)
    again = to_official_state_dict(load(state, ln, size))
    assert again.keys() == state.keys()
    for key in state:
        assert torch.equal(again[key], state[key]), key


def test_checkpoint_wrapper_and_data_parallel_prefix() -> None:
    ref = official(False, SIZES[0])
    x = torch.randn(2, 6, SIZES[0][0])
    prefixed = {f"module.{k}": v for k, v in ref.state_dict().items()}
    for state in ({"state_dict": ref.state_dict()}, prefixed, {"state_dict": prefixed}):
        with torch.no_grad():
            torch.testing.assert_close(load(state, False, SIZES[0])(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors


def test_missing_key() -> None:
    state = official(False, SIZES[0]).state_dict()
    del state["enc.1.mab0.fc_k.bias"]
    with pytest.raises(ValueError, match=r"^state_dict: .*missing keys: \['enc\.1\.mab0\.fc_k\.bias'\]"):
        load(state, False, SIZES[0])


def test_unexpected_key() -> None:
    state = official(False, SIZES[0]).state_dict()
    state["dec.1.mab.fc_x.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys: \['dec\.1\.mab\.fc_x\.weight'\]"):
        load(state, False, SIZES[0])


@pytest.mark.parametrize("ln", [False, True], ids=["weights-without-ln", "weights-with-ln"])
def test_wrong_ln_flag_is_named(ln: bool) -> None:
    state = official(ln, SIZES[0]).state_dict()
    with pytest.raises(ValueError, match=rf"pass ln={ln}"):
        load(state, not ln, SIZES[0])


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    state = official(False, SIZES[0]).state_dict()
    wrong_inds = (*SIZES[0][:3], 6, *SIZES[0][4:])
    with pytest.raises(
        ValueError, match=r"^state_dict\['enc\.0\.I'\]: expected shape \(1, 6, 16\).*got \(1, 8, 16\)"
    ):
        load(state, False, wrong_inds)
    wrong_input = (5, *SIZES[0][1:])
    with pytest.raises(ValueError, match=r"fc_k\.weight'\]: expected shape \(16, 5\).*got \(16, 2\)"):
        load(state, False, wrong_input)


def test_not_tensors() -> None:
    with pytest.raises(TypeError, match=r"^state_dict: expected a mapping"):
        load([("enc.0.I", torch.zeros(1))], False, SIZES[0])  # type: ignore[arg-type]
    state = official(False, SIZES[0]).state_dict()
    state["dec.3.bias"] = [0.0] * 4  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"^state_dict\['dec\.3\.bias'\]: expected a tensor, got list"):
        load(state, False, SIZES[0])


def test_to_official_rejects_other_configurations() -> None:
    with pytest.raises(ValueError, match=r"^model: .*scale=None.*residual='auto'.*out_proj=True"):
        to_official_state_dict(SetTransformer(2, 1, 1, dim_hidden=16, num_inducing=4))
    with pytest.raises(ValueError, match=r"num_inducing=None"):
        to_official_state_dict(_sab_model())
    with pytest.raises(TypeError, match=r"^model: expected a SetTransformer"):
        to_official_state_dict(nn.Linear(2, 2))  # type: ignore[arg-type]


def _sab_model() -> SetTransformer:
    model = official_set_transformer(2, 1, 1, dim_hidden=16)
    return SetTransformer(**{**model.config, "num_inducing": None})
