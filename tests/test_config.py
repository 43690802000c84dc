"""Size configs give the report's exact parameter counts; impossible configs fail before compiling."""

import pathlib

import pytest

from polyglot_jax.config import load_config, validate
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig, count_params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _independent_count(c) -> int:
    """Closed form: embeddings in and out, per layer 2 LNs + QKV + dense + MLP (biases), final LN."""
    d, f, v, layers = c.d_model, c.d_ff, c.vocab_size, c.num_layers
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return 2 * v * d + layers * per_layer + 2 * d


@pytest.mark.parametrize(
    "name, expected",
    [
        ("polyglot_ko_1_3b", 1_331_810_304),  # report Table 2
        ("polyglot_ko_3_8b", 3_809_974_272),  # report Table 2
        ("polyglot_ko_5_8b", 5_885_059_072),  # report Table 2
        (
            "polyglot_ko_12_8b",
            12_893_603_840,
        ),  # released checkpoint shapes (Table 2 says 12,898,631,680)
    ],
)
def test_parameter_counts(name, expected):
    config = load_config(str(CONFIGS / f"{name}.py"))
    model_cfg, _ = validate(config, num_devices=8)
    assert count_params(model_cfg) == expected
    assert _independent_count(config.model) == expected


def test_size_configs_match_table_2():
    table = {  # layers, d_model, d_ff, heads, head_dim, rotary_dim
        "polyglot_ko_1_3b": (24, 2048, 8192, 16, 128, 64),
        "polyglot_ko_3_8b": (32, 3072, 12288, 24, 128, 64),
        "polyglot_ko_5_8b": (28, 4096, 16384, 16, 256, 64),
        "polyglot_ko_12_8b": (40, 5120, 20480, 40, 128, 64),
    }
    for name, row in table.items():
        m = ModelConfig.from_config(load_config(str(CONFIGS / f"{name}.py")).model)
        assert (m.num_layers, m.d_model, m.d_ff, m.num_heads, m.head_dim, m.rotary_dim) == row
        assert (m.vocab_size, m.layer_norm_eps, m.rope_base, m.max_len) == (
            30080,
            1e-5,
            10000.0,
            2048,
        )


def _tiny(**model):
    config = load_config(str(CONFIGS / "tiny.py"))
    for k, v in model.items():
        section, field = k.split("__")
        config[section][field] = v
    return config


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        (
            {"model__num_heads": 5},
            8,
            r"config\.model\.d_model=128 is not divisible by config\.model\.num_heads=5",
        ),
        ({"model__rotary_dim": 7}, 8, r"config\.model\.rotary_dim=7 must be even"),
        ({"model__rotary_dim": 34}, 8, r"config\.model\.rotary_dim=34 .*head_dim=32"),
        ({"model__attention_impl": "flash"}, 8, r"config\.model\.attention_impl='flash'"),
        ({"model__remat_policy": "some"}, 8, r"config\.model\.remat_policy='some'"),
        ({"model__dtype": "float8"}, 8, r"config\.model\.dtype='float8'"),
        ({"model__num_layers": 0}, 8, r"config\.model\.num_layers=0 must be a positive int"),
        (
            {"model__vocab_size": 4100, "mesh__model": 8, "mesh__data": 1},
            8,
            r"config\.model\.num_heads=4 .*model",
        ),
        (
            {"model__vocab_size": 4098, "mesh__model": 4, "mesh__data": 2},
            8,
            r"config\.model\.vocab_size=4098 .*model",
        ),
        (
            {"model__d_ff": 250, "mesh__model": 4, "mesh__data": 2},
            8,
            r"config\.model\.d_ff=250 .*model",
        ),
        (
            {"model__d_model": 68, "model__rotary_dim": 8, "mesh__fsdp": 8, "mesh__data": 1},
            8,
            r"d_model=68 .*fsdp",
        ),
        ({"mesh__data": 3}, 8, r"config\.mesh: axes multiply to 3 but there are 8 devices"),
        (
            {"mesh__model": 3},
            8,
            r"config\.mesh: the fixed axes \(product 3\) do not divide the 8 devices",
        ),
        ({"mesh__fsdp": -1}, 8, r"config\.mesh: only one axis may be -1"),
        ({"mesh__model": 0}, 8, r"config\.mesh\.model=0 must be a positive int or -1"),
    ],
)
def test_rejected_configs(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(_tiny(**overrides), num_devices=devices)


def test_unknown_model_field_is_named():
    config = _tiny()
    config.model.num_experts = 8
    with pytest.raises(ConfigError, match="unknown field.*num_experts"):
        validate(config, num_devices=1)


def test_missing_config_file():
    with pytest.raises(InputError, match="does not exist"):
        load_config("configs/no_such_config.py")


def test_tiny_divides_every_8_device_layout():
    for mesh in (
        {"data": 8},
        {"fsdp": 8},
        {"data": 2, "model": 4},
        {"data": 2, "fsdp": 2, "model": 2},
    ):
        config = _tiny()
        config.mesh.data = 1
        for axis, size in mesh.items():
            config.mesh[axis] = size
        validate(config, num_devices=8)
