"""Config validation: bad values are refused with the field name and the expected value."""

from __future__ import annotations

import json

import pytest
import torch

from mxd_lens import MxD, MxDConfig, TranscoderConfig
from mxd_lens.config import field_docs
from mxd_lens.functional import ACT_FNS

GOOD = dict(d_in=7, d_out=5, d_hidden=11, n_experts=13, k=3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(k=0), r"k=0 must be a positive integer"),
        (dict(k=-2), r"k=-2 must be a positive integer"),
        (dict(k=14), r"k=14 is larger than n_experts=13"),
        (dict(n_experts=0), r"n_experts=0 must be a positive integer"),
        (dict(d_in=0), r"d_in=0"),
        (dict(d_out=2.5), r"d_out=2.5"),
        (dict(d_hidden=True), r"d_hidden=True"),
        (dict(act_fn="swish"), r"act_fn='swish' is not supported; expected one of \["),
        (dict(input_site="resid"), r"input_site='resid'"),
        (dict(dtype="int32"), r"dtype='int32' is not a floating-point torch dtype"),
        (dict(dtype="float33"), r"dtype='float33'"),
    ],
)
def test_mxd_config_refuses_bad_values(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        MxDConfig(**{**GOOD, **overrides})


@pytest.mark.parametrize(
    "overrides,message",
    [(dict(k=0), r"k=0"), (dict(k=20), r"k=20 is larger than d_sae=19"), (dict(d_sae=0), r"d_sae=0")],
)
def test_transcoder_config_refuses_bad_values(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        TranscoderConfig(**{**dict(d_in=7, d_out=5, d_sae=19, k=4), **overrides})


def test_every_act_fn_is_accepted_and_k_equal_n_is_fine() -> None:
    for name in ACT_FNS:
        assert MxDConfig(**GOOD, act_fn=name).act_fn == name
    assert MxDConfig(**{**GOOD, "k": 13}).k == 13


def test_torch_dtype_is_stored_as_a_string() -> None:
    cfg = MxDConfig(**GOOD, dtype=torch.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert MxD(cfg).W_enc.dtype == torch.bfloat16


def test_json_round_trip_and_unknown_fields() -> None:
    cfg = MxDConfig(**GOOD, glu=True, act_fn="silu", hook_name="blocks.3.ln2.hook_normalized", layer=3)
    again = MxDConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown MxDConfig fields \['colour'\]"):
        MxDConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    tc = TranscoderConfig(d_in=7, d_out=5, d_sae=19, k=4)
    assert TranscoderConfig.from_dict(tc.to_dict()) == tc
    assert (cfg.n_units, tc.n_units) == (13, 19)


@pytest.mark.parametrize("cls", [MxDConfig, TranscoderConfig])
def test_every_field_has_a_docstring(cls) -> None:
    import dataclasses

    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
