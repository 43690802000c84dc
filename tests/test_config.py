"""Size configs give the report's exact parameter counts; impossible configs fail before compiling."""

import logging
import pathlib
import types

import jax
import pytest

from polyglot_jax.attention import check_attention_backend
from polyglot_jax.config import check_train, load_config, validate
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig, count_params
from polyglot_jax.optimizer import learning_rate_schedule

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
        ({"model__rope_base": float("nan")}, 8, r"config\.model\.rope_base=nan must be a positive"),
        ({"model__rope_base": -1.0}, 8, r"config\.model\.rope_base=-1\.0 must be a positive"),
        ({"model__rope_base": float("inf")}, 8, r"config\.model\.rope_base=inf must be finite"),
        (
            {"model__layer_norm_eps": 0.0},
            8,
            r"config\.model\.layer_norm_eps=0\.0 must be a positive",
        ),
        ({"model__layer_norm_eps": float("nan")}, 8, r"config\.model\.layer_norm_eps=nan"),
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
            r"config\.model\.d_ff=250 .*model.*sizes that divide it: 1, 2, 5$",
        ),
        (
            {"model__d_model": 68, "model__rotary_dim": 8, "mesh__fsdp": 8, "mesh__data": 1},
            8,
            r"d_model=68 .*fsdp",
        ),
        (
            {"mesh__data": 3},
            8,
            r"config\.mesh: axes multiply to 3 but there are 8 devices \(a layout must use them "
            r"all\); valid: sizes multiplying to 8 from 1, 2, 4, 8, or one axis -1",
        ),
        (
            {"mesh__model": 3},
            8,
            r"config\.mesh: the fixed axes \(product 3\) do not divide the 8 devices; valid: "
            r"sizes multiplying to 8 from 1, 2, 4, 8",
        ),
        ({"mesh__fsdp": -1}, 8, r"config\.mesh: only one axis may be -1"),
        ({"mesh__model": 0}, 8, r"config\.mesh\.model=0 must be a positive int or -1"),
    ],
)
def test_rejected_configs(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(_tiny(**overrides), num_devices=devices)


def test_divisibility_follows_the_rules():
    """The check is derived from config.mesh.rules: unsharded axes are free, newly sharded ones
    are checked (d_ff 250 over model 4, head_dim 32 over model 8 x ... )."""
    replicated_mlp = tuple((k, None if k == "mlp" else v) for k, v in _tiny().mesh.rules)
    validate(_tiny(model__d_ff=250, mesh__model=4, mesh__data=2, mesh__rules=replicated_mlp), 8)
    sharded_kv = tuple((k, "fsdp" if k == "kv" else v) for k, v in _tiny().mesh.rules)
    with pytest.raises(
        ConfigError, match=r"head_dim .*=32 is not divisible by the fsdp mesh axis \(size 64\)"
    ):
        validate(_tiny(mesh__fsdp=64, mesh__data=1, mesh__rules=sharded_kv), 64)
    with pytest.raises(ConfigError, match=r"config\.model\.d_ff=250 .*rules give 'mlp'"):
        validate(_tiny(model__d_ff=250, mesh__model=4, mesh__data=2), 8)


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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", -1e-3, r"config\.train\.lr=-0\.001 must be a finite number >= 0"),
        ("lr", NAN, r"config\.train\.lr=nan must be a finite number"),
        ("lr", INF, r"config\.train\.lr=inf must be a finite number"),
        ("b1", 1.0, r"config\.train\.b1=1\.0 must be a finite number within \[0, 1\)"),
        ("b1", -0.1, r"config\.train\.b1=-0\.1 must be a finite number within \[0, 1\)"),
        ("b2", 1.5, r"config\.train\.b2=1\.5 must be a finite number within \[0, 1\)"),
        ("b2", NAN, r"config\.train\.b2=nan"),
        ("eps", 0.0, r"config\.train\.eps=0\.0 must be a finite number > 0"),
        ("eps", -1e-8, r"config\.train\.eps=-1e-08 must be a finite number > 0"),
        ("weight_decay", -0.01, r"config\.train\.weight_decay=-0\.01 must be a finite number >= 0"),
        ("clip_norm", -1.0, r"config\.train\.clip_norm=-1\.0 must be a finite number >= 0"),
        ("z_loss", -1e-4, r"config\.train\.z_loss=-0\.0001 must be a finite number >= 0"),
        ("z_loss", NAN, r"config\.train\.z_loss=nan must be a finite number >= 0"),
        ("min_lr_ratio", 1.5, r"config\.train\.min_lr_ratio=1\.5 .*within \[0, 1\]"),
        ("min_lr_ratio", -0.1, r"config\.train\.min_lr_ratio=-0\.1 .*within \[0, 1\]"),
        ("decay", "step", r"config\.train\.decay='step' is not one of \('cosine', 'linear'\)"),
        ("warmup_steps", -1, r"config\.train\.warmup_steps=-1 must be an int >= 0"),
        ("steps", 0, r"config\.train\.steps=0 must be a positive int"),
        ("loss_chunk", -4, r"config\.train\.loss_chunk=-4 must be a positive int"),
        ("keep_checkpoints", 0, r"config\.train\.keep_checkpoints=0 must be a positive int"),
        ("keep_every", -1, r"config\.train\.keep_every=-1 must be an int >= 0"),
        ("spike_halflife", -5, r"config\.train\.spike_halflife=-5 must be an int >= 0"),
        ("seed", -1, r"config\.train\.seed=-1 must be an int within \[0, 2\*\*32\)"),
        ("seed", 2**32, r"config\.train\.seed=4294967296 must be an int within"),
        ("peak_flops_per_device", -1.0, r"config\.train\.peak_flops_per_device=-1\.0"),
        ("spike_threshold", NAN, r"config\.train\.spike_threshold=nan"),
        ("drop_threshold", 1.5, r"config\.train\.drop_threshold=1\.5 .*within \[0, 1\]"),
        (
            "profile_steps",
            (1,),
            r"config\.train\.profile_steps=\(1,\) must be \(first step, count\)",
        ),
        ("profile_steps", (-1, 2), r"config\.train\.profile_steps=\(-1, 2\)"),
        ("nan_policy", "ignore", r"config\.train\.nan_policy='ignore'"),
        ("seq_len", 256, r"config\.train\.seq_len=256 exceeds config\.model\.max_len=128"),
    ],
)
def test_rejected_train_fields(field, value, message):
    config = _tiny()
    config.train[field] = value
    model_cfg, mesh_shape = validate(config, num_devices=1)
    with pytest.raises(ConfigError, match=message) as caught:
        check_train(config, model_cfg, mesh_shape)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_shipped_config_passes_the_train_checks(name, caplog):
    config = load_config(str(CONFIGS / f"{name}.py"))
    model_cfg, mesh_shape = validate(config, num_devices=8)
    check_train(config, model_cfg, mesh_shape)
    assert "warmup" not in caplog.text


def test_warmup_longer_than_the_run_is_clipped_with_a_warning(caplog):
    """`--config.train.steps=5` on tiny (warmup 30) just runs: the schedule warms up over the run."""
    config = _tiny(train__steps=5)
    model_cfg, mesh_shape = validate(config, num_devices=1)
    with caplog.at_level(logging.WARNING):
        check_train(config, model_cfg, mesh_shape)
    assert "config.train.warmup_steps=30 is longer than the run (steps=5)" in caplog.text
    schedule = learning_rate_schedule(config.train)
    lr = config.train.lr
    assert [float(schedule(s)) for s in range(6)] == pytest.approx([lr * s / 5 for s in range(6)])


@pytest.mark.parametrize(
    "body, message",
    [
        ("def get_config():\n    return foo\n", r"bad\.py:2: NameError: name 'foo' is not defined"),
        ("def get_config(:\n    pass\n", r"bad\.py:1: SyntaxError: "),
        ("import no_such_module_xyz\n", r"bad\.py:1: ModuleNotFoundError: .*no_such_module_xyz"),
        ("\n\ndef get_config():\n    return None\n", r"bad\.py:3: get_config\(\) returned None"),
        ("def get_config():\n    return {}\n", r"bad\.py:1: get_config\(\) returned dict"),
        ("x = 1\n", r"bad\.py defines no get_config\(\)"),
    ],
)
def test_load_config_errors_name_file_and_line(tmp_path, body, message):
    (tmp_path / "bad.py").write_text(body)
    with pytest.raises(InputError, match=message) as caught:
        load_config(str(tmp_path / "bad.py"))
    assert len(str(caught.value).splitlines()) == 1


def test_load_config_variant_that_get_config_does_not_take():
    with pytest.raises(InputError, match=r"tiny\.py:11: TypeError: get_config\(\) takes 0"):
        load_config(str(CONFIGS / "tiny.py") + ":fast")


def _device(platform: str, kind: str, version: str = "", capability: str | None = None):
    """A stand-in for a jax.Device with the attributes the backend check reads."""
    device = types.SimpleNamespace(
        platform=platform, device_kind=kind, client=types.SimpleNamespace(platform_version=version)
    )
    if capability is not None:
        device.compute_capability = capability
    return device


H100 = _device("gpu", "NVIDIA H100 80GB HBM3", "cuda 12080", "9.0")
A100 = _device("gpu", "NVIDIA A100-SXM4-80GB", "cuda 12080", "8.0")
B200 = _device("gpu", "NVIDIA B200", "cuda 12080", "10.0")
MI300 = _device("gpu", "AMD Instinct MI300X", "rocm 60300", "gfx942")
TPU = _device("tpu", "TPU v5 lite")
CPU = _device("cpu", "cpu")


@pytest.mark.parametrize(
    "impl, device, message",
    [
        ("cudnn", CPU, r"attention_impl='cudnn' needs an NVIDIA GPU; this run's backend is cpu"),
        ("cudnn", TPU, r"attention_impl='cudnn' needs an NVIDIA GPU; .*tpu \(TPU v5 lite\)"),
        ("cudnn", MI300, r"attention_impl='cudnn' needs an NVIDIA GPU; .*MI300X"),
        ("pallas_hopper", CPU, r"attention_impl='pallas_hopper' needs an sm_90 .*backend is cpu"),
        ("pallas_hopper", TPU, r"attention_impl='pallas_hopper' needs an sm_90 .*tpu"),
        ("pallas_hopper", A100, r"attention_impl='pallas_hopper' needs an sm_90 .*A100.*sm_80"),
        ("pallas_hopper", B200, r"attention_impl='pallas_hopper' needs an sm_90 .*sm_100"),
        ("pallas_hopper", MI300, r"attention_impl='pallas_hopper' needs an sm_90 .*MI300X"),
    ],
)
def test_attention_impl_needs_its_backend(impl, device, message):
    with pytest.raises(ConfigError, match=message):
        check_attention_backend(impl, device)


@pytest.mark.parametrize("device", [H100, A100, B200, MI300, TPU, CPU])
def test_portable_attention_impls_run_anywhere(device):
    for impl in ("xla", "pallas"):
        check_attention_backend(impl, device)
    check_attention_backend("cudnn", H100)
    check_attention_backend("pallas_hopper", H100)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks this machine's CPU backend")
@pytest.mark.parametrize("impl", ["cudnn", "pallas_hopper"])
def test_train_refuses_a_kernel_this_backend_lacks(impl):
    """The trainer's pre-compile check uses the real device (the model itself still runs
    pallas_hopper in GPU interpret mode on CPU, as tests/test_model.py does)."""
    from polyglot_jax.config import validate_run

    hopper_shapes = {"model__num_heads": 2, "model__rotary_dim": 32, "model__dtype": "bfloat16"}
    config = _tiny(model__attention_impl=impl, **hopper_shapes)
    model_cfg, mesh_shape = validate(config, num_devices=1)
    check_train(config, model_cfg, mesh_shape)  # info's checks pass: the config is fine elsewhere
    validate_run(config, 1, this_machine=False)  # what info checks
    with pytest.raises(ConfigError, match=rf"attention_impl='{impl}' needs .*backend is cpu"):
        validate_run(config, 1)


def test_the_data_check_prepares_nothing(tmp_path):
    """check_data judges the built-in sample by its tokenizer's size, without building it."""
    from polyglot_jax.config import check_data

    config = _tiny(model__vocab_size=1024)
    config.data.cache_dir = str(tmp_path / "cache")
    model_cfg, _ = validate(config, 8)
    with pytest.raises(ConfigError, match=r"vocab_size=1024 is smaller than the 4096 token ids"):
        check_data(config, model_cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "pack", r"config\.data\.mode='pack'"),
        ("shuffle_buffer", 0, r"config\.data\.shuffle_buffer=0 must be an int >= 1"),
        ("prefetch", -1, r"config\.data\.prefetch=-1 must be an int >= 0"),
        ("shards", (), r"config\.data\.shards is empty"),
        ("weights", (1.0, 2.0), r"config\.data\.weights has 2 entries for 1 shards"),
    ],
)
def test_bad_data_fields(field, value, message, tmp_path):
    from polyglot_jax.config import check_data

    config = _tiny()
    config.data[field] = value
    with pytest.raises(ConfigError, match=message):
        check_data(config, validate(config, 8)[0])


def test_missing_data_directories_are_skipped_only_when_asked(tmp_path):
    from polyglot_jax.config import check_data

    config = _tiny()
    config.data.shards = (str(tmp_path / "elsewhere"),)
    model_cfg, _ = validate(config, 8)
    check_data(config, model_cfg, missing_ok=True)
    with pytest.raises(InputError, match="elsewhere"):
        check_data(config, model_cfg)
