"""Our params <-> HF state dict and config.json, checked against real transformers objects."""

import numpy as np
import pytest
from hf_reference import hf_state_dict, random_hf_model
from transformers import GPTNeoXConfig

from polyglot_jax.errors import InputError
from polyglot_jax.hf import mapping
from polyglot_jax.model import ModelConfig

CFG = ModelConfig(
    vocab_size=96, num_layers=2, d_model=80, d_ff=160, num_heads=5, rotary_dim=4, dtype="float32"
)


def _as_files(sd: dict) -> dict:
    """transformers 5 names the output `lm_head` in memory and `embed_out` in files."""
    sd = dict(sd)
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_reproduces_state_dict_exactly(scan_layers):
    cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers})
    sd = _as_files(hf_state_dict(random_hf_model(cfg)))
    back = mapping.to_hf_state_dict(mapping.from_hf_state_dict(sd, cfg), cfg)
    assert list(back) == [s.hf_key for s in mapping.tensor_specs(cfg)]
    assert set(back) == set(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and np.array_equal(back[key], sd[key]), key


def test_qkv_is_grouped_per_head():
    """Row block h*3*Dh.. of HF's fused weight is head h's [q; k; v]: a plain 3-way split is wrong."""
    sd = _as_files(hf_state_dict(random_hf_model(CFG)))
    params = mapping.from_hf_state_dict(sd, CFG)
    w = sd["gpt_neox.layers.1.attention.query_key_value.weight"]  # [3D, D]
    dh = CFG.head_dim
    head, part = 3, 1  # head 3's key projection
    rows = w[(head * 3 + part) * dh : (head * 3 + part + 1) * dh]
    np.testing.assert_array_equal(
        params["layers"]["attention"]["qkv_kernel"][1][:, head, part, :], rows.T
    )


def test_lm_head_name_and_legacy_buffers_are_accepted():
    sd = hf_state_dict(random_hf_model(CFG))  # in-memory names: lm_head.weight
    sd["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
    sd["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9)
    sd["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    params = mapping.from_hf_state_dict(sd, CFG)
    np.testing.assert_array_equal(params["embed_out"], sd["lm_head.weight"].T)


def test_missing_key_is_named():
    sd = _as_files(hf_state_dict(random_hf_model(CFG)))
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    with pytest.raises(
        InputError, match=r"missing tensor gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias"
    ):
        mapping.from_hf_state_dict(sd, CFG)


def test_shape_mismatch_names_key_and_both_shapes():
    sd = _as_files(hf_state_dict(random_hf_model(CFG)))
    sd["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] = np.zeros((160, 81), np.float32)
    with pytest.raises(
        InputError, match=r"dense_h_to_4h\.weight has shape \(160, 81\), expected \(160, 80\)"
    ):
        mapping.from_hf_state_dict(sd, CFG)


def test_unexpected_tensor_is_an_error():
    sd = _as_files(hf_state_dict(random_hf_model(CFG)))
    sd["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"] = np.zeros((160, 80), np.float32)
    with pytest.raises(InputError, match="unexpected tensor"):
        mapping.from_hf_state_dict(sd, CFG)


def test_config_round_trip_through_transformers():
    """Our config.json -> transformers' GPTNeoXConfig -> its saved dict -> our config."""
    for cfg in (CFG, ModelConfig(30080, 28, 4096, 16384, 16, 64)):
        hf = GPTNeoXConfig(**mapping.to_hf_config(cfg))
        assert int(
            hf.hidden_size // hf.num_attention_heads * hf.rope_parameters["partial_rotary_factor"]
        ) == (cfg.rotary_dim)
        back = mapping.from_hf_config(hf.to_dict())
        for key, value in back.items():
            assert getattr(cfg, key) == value, key


def test_released_style_config_json():
    """The field names of the released polyglot-ko-1.3b config.json (old rotary names)."""
    released = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
        "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16, "num_hidden_layers": 24,
        "rotary_emb_base": 10000, "rotary_pct": 0.5, "max_position_embeddings": 2048, "vocab_size": 30080,
        "layer_norm_eps": 1e-05, "tie_word_embeddings": False, "use_parallel_residual": True,
        "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float16",
    }  # fmt: skip
    fields = mapping.from_hf_config(released)
    assert fields == {
        "vocab_size": 30080, "num_layers": 24, "d_model": 2048, "d_ff": 8192, "num_heads": 16,
        "rotary_dim": 64, "rope_base": 10000.0, "max_len": 2048, "layer_norm_eps": 1e-5,
    }  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "not GPTNeoXForCausalLM"),
        ({"use_parallel_residual": False}, "use_parallel_residual"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, message):
    hf = {**mapping.to_hf_config(CFG), **change}
    with pytest.raises(InputError, match=message):
        mapping.from_hf_config(hf)


def test_hf_config_missing_field():
    hf = mapping.to_hf_config(CFG)
    del hf["intermediate_size"]
    with pytest.raises(InputError, match="intermediate_size"):
        mapping.from_hf_config(hf)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, r"num_attention_heads=0 must be a positive integer"),
        ({"num_attention_heads": -5}, r"num_attention_heads=-5 must be a positive integer"),
        ({"hidden_size": "80"}, r"hidden_size='80' must be a positive integer"),
        ({"hidden_size": 80.0}, r"hidden_size=80\.0 must be a positive integer"),
        ({"num_hidden_layers": None}, r"num_hidden_layers=None must be a positive integer"),
        ({"num_hidden_layers": True}, r"num_hidden_layers=True must be a positive integer"),
        ({"vocab_size": False}, r"vocab_size=False must be a positive integer"),
        ({"intermediate_size": 0}, r"intermediate_size=0 must be a positive integer"),
        ({"max_position_embeddings": None}, r"max_position_embeddings=None must be a positive"),
        ({"hidden_size": 81}, r"hidden_size=81 is not divisible by num_attention_heads=5"),
        ({"rope_parameters": [10000.0]}, r"rope_parameters=\[10000\.0\] must be a JSON object"),
        ({"rope_parameters": "default"}, r"rope_parameters='default' must be a JSON object"),
        ({"rotary_pct": 0}, r"rotary_pct=0 must be a finite number within \(0, 1\]"),
        ({"rotary_pct": 1.5}, r"rotary_pct=1\.5 must be a finite number within \(0, 1\]"),
        ({"rotary_pct": "half"}, r"rotary_pct='half' must be a finite number"),
        ({"rotary_pct": True}, r"rotary_pct=True must be a finite number"),
        ({"rotary_pct": 0.19}, r"rotary_pct=0\.19 gives an odd rotary dimension 3"),
        (
            {"rope_parameters": {"partial_rotary_factor": -0.5}},
            r"rope_parameters\.partial_rotary_factor=-0\.5 must be a finite number within",
        ),
        (
            {"rope_parameters": {"rope_theta": 0}},
            r"rope_parameters\.rope_theta=0 must be a finite number > 0",
        ),
        ({"rotary_emb_base": float("nan")}, r"rotary_emb_base=nan must be a finite number > 0"),
        ({"layer_norm_eps": -1e-5}, r"layer_norm_eps=-1e-05 must be a finite number > 0"),
        ({"architectures": "GPTNeoXForCausalLM"}, r"architectures='GPTNeoX.*' must be a list"),
    ],
)
def test_malformed_hf_config_fields_are_named(change, message):
    hf = {**mapping.to_hf_config(CFG), **change}
    with pytest.raises(InputError, match=r"^some/config\.json.*" + message) as caught:
        mapping.from_hf_config(hf, source="some/config.json")
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("value", [[1, 2], "config", None, 3])
def test_hf_config_that_is_not_an_object(value):
    with pytest.raises(InputError, match=r"config\.json: not a JSON object"):
        mapping.from_hf_config(value)


def test_good_hf_configs_still_pass():
    """The default names, transformers 5's rope_parameters, and integral rope bases."""
    hf = mapping.to_hf_config(CFG)
    assert mapping.from_hf_config(hf)["rotary_dim"] == 4
    nested = {k: v for k, v in hf.items() if k not in ("rotary_pct", "rotary_emb_base")}
    nested["rope_parameters"] = {"rope_theta": 500, "partial_rotary_factor": 1.0}
    fields = mapping.from_hf_config(nested)
    assert (fields["rotary_dim"], fields["rope_base"]) == (16, 500.0)
    assert mapping.from_hf_config({**hf, "rope_parameters": None})["rotary_dim"] == 4
