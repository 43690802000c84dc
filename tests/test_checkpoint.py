"""Reading checkpoints outside training (conversion, generation, init_from): damage is named, and
the latest falls back to an older readable step only when no step was asked for."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import numpy as np
import pytest
from train_fixtures import tiny_config, tiny_shards

from polyglot_jax.checkpoint import load_params
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig
from polyglot_jax.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    shards = tiny_shards(tmp_path_factory.mktemp("cache"))
    workdir = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(shards), workdir)  # checkpoints 3 and 6
    return workdir


def _damaged_copy(run: pathlib.Path, tmp_path: pathlib.Path, step: int) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / str(step) / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    return copy


def _cfg(run: pathlib.Path) -> ModelConfig:
    from polyglot_jax.workdir import load_run_config

    return ModelConfig.from_config(load_run_config(run).model)


def test_latest_falls_back_to_the_previous_readable_step(run, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    damaged = _damaged_copy(run, tmp_path, 6)
    params = load_params(damaged, None, _cfg(run))
    expected = load_params(run, 3, _cfg(run))
    np.testing.assert_array_equal(params["embed_in"], expected["embed_in"])
    assert f"checkpoint {damaged / 'checkpoints' / '6'} cannot be read" in caplog.text
    assert (damaged / "checkpoints" / "6").is_dir()  # reading never moves anything


def test_an_asked_for_damaged_step_is_named_with_the_previous_one(run, tmp_path):
    damaged = _damaged_copy(run, tmp_path, 6)
    with pytest.raises(
        InputError,
        match=r"checkpoints/6 cannot be read \(.*\); the previous one is step 3 \(--step=3\)",
    ):
        load_params(damaged, 6, _cfg(run))


def test_params_of_another_model_are_a_config_error(run):
    import dataclasses

    with pytest.raises(ConfigError, match=r"embed_in saved \(4096, 64\), now \(4096, 32\)"):
        load_params(run, None, dataclasses.replace(_cfg(run), d_model=32, rotary_dim=4))


def _truncated_copy(run: pathlib.Path, tmp_path: pathlib.Path, step: int) -> pathlib.Path:
    """The metadata intact, the largest array data file cut in half (a disk that filled up)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    files = [f for f in (copy / "checkpoints" / str(step) / "params").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    return copy


def test_truncated_array_data_falls_back_without_echoes(run, tmp_path, capfd, caplog):
    caplog.set_level(logging.WARNING)
    damaged = _truncated_copy(run, tmp_path, 6)
    params = load_params(damaged, None, _cfg(run))
    np.testing.assert_array_equal(params["embed_in"], load_params(run, 3, _cfg(run))["embed_in"])
    assert "checkpoints/6 cannot be read (OUT_OF_RANGE" in caplog.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "TensorStore" not in err and "Event loop" not in err


def test_to_hf_of_a_truncated_checkpoint_names_it_and_the_previous_step(run, tmp_path):
    from polyglot_jax.hf.convert import to_hf

    damaged = _truncated_copy(run, tmp_path, 6)
    with pytest.raises(
        InputError,
        match=r"checkpoints/6 cannot be read \(.*\); the previous one is step 3 \(--step=3\)",
    ):
        to_hf(damaged, tmp_path / "hf", show_progress=False)
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.partial-*"))
    to_hf(damaged, tmp_path / "hf", step=3, show_progress=False)  # the suggested step works
    assert (tmp_path / "hf" / "model.safetensors").is_file()
