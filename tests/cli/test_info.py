"""`polyglot-jax info` as a user runs it: exact counts in JSON, one-line errors with exit code 2."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_info_json_counts_12_8b():
    out = _run("info", "--config=configs/polyglot_ko_12_8b.py", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"] == 12_893_603_840
    assert info["shapes"]["layers/attention/qkv_kernel"]["shape"] == [40, 5120, 40, 3, 128]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/tiny.py", "--config.model.rotary_dim=7"], "config.model.rotary_dim=7"),
        (["--config=configs/tiny.py", "--config.model.bogus=1"], "no such config field"),
        (["--config=configs/missing.py"], "No such file"),
        (
            ["--config=configs/tiny.py", "--config.mesh.model=8", "--devices=8"],
            "config.model.num_heads=4",
        ),
        ([], "--config is required"),
        (["--config=configs/tiny.py", "--devices=0"], "--devices=0 must be a positive int"),
        (["--config=configs/tiny.py", "--devices=-8"], "--devices=-8 must be a positive int"),
        (["--config=configs/tiny.py", "--config.train.lr=nan"], "config.train.lr=nan"),
        (["--config=configs/tiny.py", "--config.train.b2=1.0"], "config.train.b2=1.0"),
        (
            ["--config=configs/tiny.py", "--config.train.batch_size=12", "--devices=8"],
            "12 sequences per microbatch is not divisible",
        ),
        (["--config=configs/tiny.py", "--no_such_flag"], "no_such_flag"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    out = _run("info", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_show_devices_names_the_backend_platform_version_and_every_device():
    """What a cluster user runs after `pip install -e '.[cuda13]'`: here the 8 fake CPU devices
    of the test environment (conftest's XLA_FLAGS, inherited by the subprocess)."""
    import jax
    import jaxlib

    out = _run("info", "--show_devices", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["jax"], report["jaxlib"]) == (jax.__version__, jaxlib.__version__)
    assert report["backend"] == "cpu" and report["platform_version"] == "cpu"
    assert report["device_count"] == report["local_device_count"] == 8
    assert (report["process_index"], report["process_count"]) == (0, 1)
    assert [d["id"] for d in report["devices"]] == list(range(8))
    assert {(d["platform"], d["kind"], d["process"]) for d in report["devices"]} == {
        ("cpu", "cpu", 0)
    }
    assert report["plugins"] == {}  # no jax-cuda*/libtpu plugin on a CPU test machine

    text = _run("info", "--show_devices")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"jax         {jax.__version__} (jaxlib {jaxlib.__version__})"
    assert lines[1] == "backend     cpu (platform version: cpu)"
    assert lines[2] == "devices     8 (8 local, process 0 of 1)"
    assert len([line for line in lines if line.startswith("  ")]) == 8
    assert lines[-1] == "plugins     none (CPU only)"


def test_show_devices_with_a_config_adds_the_backend_to_the_summary():
    out = _run("info", "--config=configs/tiny.py", "--show_devices", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"] > 0 and info["backend"]["device_count"] == 8


def test_info_checks_the_train_section_but_not_this_machines_kernels():
    """A short run of tiny (warmup 30 > steps 5) is fine; a pallas_hopper config for an H100 can
    be inspected on a CPU machine (only `train` checks the attention kernel against the backend)."""
    out = _run("info", "--config=configs/tiny.py", "--config.train.steps=5", "--json")
    assert out.returncode == 0, out.stderr
    hopper = ["--config.model.attention_impl=pallas_hopper", "--config.model.dtype=bfloat16"]
    out = _run("info", "--config=configs/polyglot_ko_1_3b.py", *hopper, "--json")
    assert out.returncode == 0, out.stderr


BAD_CONFIGS = {
    "name_error.py": (
        "from polyglot_jax.config import base_config\n\n\ndef get_config():\n"
        "    c = base_config()\n    return foo\n",
        ":6: NameError: name 'foo' is not defined",
    ),
    "value_error.py": (
        "def get_config():\n    raise ValueError('no such size\\nsecond line')\n",
        ":2: ValueError: no such size",
    ),
    "syntax_error.py": ("def get_config(:\n    pass\n", ":1: SyntaxError: "),
    "import_error.py": (
        "import polyglot_jax.no_such_module\n",
        ":1: ModuleNotFoundError: No module named 'polyglot_jax.no_such_module'",
    ),
    "returns_none.py": (
        "def get_config():\n    pass\n",
        ":1: get_config() returned None, not an ml_collections.ConfigDict",
    ),
    "returns_dict.py": (
        "def get_config():\n    return {'model': {}}\n",
        ":1: get_config() returned dict, not an ml_collections.ConfigDict",
    ),
    "no_get_config.py": ("c = 1\n", ": defines no get_config()"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_broken_config_file_is_one_line_naming_file_and_line(tmp_path, name):
    body, message = BAD_CONFIGS[name]
    (tmp_path / name).write_text(body)
    out = _run("info", f"--config={tmp_path / name}")
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{tmp_path / name}{message}" in out.stderr, out.stderr


def test_variant_that_get_config_does_not_take():
    out = _run("info", "--config=configs/tiny.py:fast")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "configs/tiny.py:11: TypeError: get_config() takes 0 positional arguments" in out.stderr
    assert "'fast'" in out.stderr


def test_unknown_subcommand():
    out = _run("nonsense")
    assert out.returncode == 2 and "unknown subcommand" in out.stderr


def test_top_level_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("info", "clean", "train-tokenizer", "tokenize", "train", "convert", "generate"):
        assert f"\n  {sub} " in out.stdout
