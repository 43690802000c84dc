"""A workdir is never lost: which config changes a resume takes, the lock, torn metrics, cleanup;
and what every reader sees in it: one listing of its finished steps, its tokenizer.

Every refused resume must leave the workdir byte for byte as it was (checkpoints, config.json,
metrics.jsonl), since that is the bug this guards: a mismatch once moved every good checkpoint
aside and restarted at step 0 with exit 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil

import pytest
from train_fixtures import tiny_config, tiny_shards

from polyglot_jax import workdir as wd
from polyglot_jax.checkpoint import Checkpointer, load_params
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig
from polyglot_jax.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base_run(shards, tmp_path_factory) -> pathlib.Path:
    """3 steps of the tiny config, checkpointed at step 3."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(shards, train__steps=3), workdir)
    return workdir


@pytest.fixture
def run(base_run, tmp_path) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def _snapshot(workdir: pathlib.Path) -> dict[str, str]:
    """Every file under the workdir with a hash of its bytes (the lock file excepted)."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != wd.LOCK
    }


def _records(workdir: pathlib.Path) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


# ---------------------------------------------------------------- the rules, without training


DATA_KEYS = ("train.batch_size", "train.seq_len")


@pytest.mark.parametrize(
    "key, kind",
    [
        ("train.steps", "free"),
        ("train.log_every", "free"),
        ("train.checkpoint_every", "free"),
        ("mesh.fsdp", "free"),
        ("model.attention_impl", "free"),
        ("train.grad_accum", "free"),
        ("model.d_model", "shapes"),
        ("model.vocab_size", "shapes"),
        ("model.scan_layers", "shapes"),
        ("train.batch_size", "guarded"),
        ("train.seq_len", "guarded"),
        ("train.seed", "guarded"),
        ("train.lr", "guarded"),
        ("data.shards", "guarded"),
        ("data.shuffle_buffer", "guarded"),
        ("model.rotary_dim", "guarded"),
    ],
)
def test_each_field_has_its_class(key, kind):
    changes = wd.resume_changes({key: 1, "same": 0}, {key: 2, "same": 0})
    assert {k: getattr(changes, k) for k in ("free", "shapes", "guarded")} == {
        "free": {},
        "shapes": {},
        "guarded": {},
        kind: {key: (1, 2)},
    }
    assert changes.data_changed == (key.startswith("data.") or key in DATA_KEYS)


def test_fields_known_to_one_side_only_are_not_compared():
    changes = wd.resume_changes({"train.old_field": 1}, {"train.new_field": 2})
    assert not (changes.free or changes.shapes or changes.guarded)


# ---------------------------------------------------------------- refused resumes change nothing


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"model__d_model": 32}, "model.d_model 64 -> 32"),
        ({"model__num_layers": 3}, "model.num_layers 2 -> 3"),
        ({"train__batch_size": 8}, "train.batch_size 16 -> 8"),
        ({"data__shuffle_buffer": 32}, "data.shuffle_buffer 64 -> 32"),
        ({"train__seed": 1}, "train.seed 0 -> 1"),
        ({"train__lr": 1e-4}, "train.lr"),
    ],
)
def test_a_mismatched_resume_is_refused_and_touches_nothing(shards, run, overrides, named):
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=f"{named}.*--config.train.init_from={run}"):
        train(tiny_config(shards, train__steps=6, **overrides), run)
    assert _snapshot(run) == before
    assert not (run / "corrupt_checkpoints").exists()


def test_without_config_json_the_checkpoint_shapes_still_refuse(shards, run):
    (run / "config.json").unlink()
    before = _snapshot(run)
    with pytest.raises(
        ConfigError, match=r"another model.*embed_in saved \(4096, 64\), now \(4096, 32\)"
    ):
        train(tiny_config(shards, train__steps=6, model__d_model=32), run)
    assert _snapshot(run) == before
    assert not (run / "corrupt_checkpoints").exists()


# ---------------------------------------------------------------- accepted resumes


def test_more_steps_and_other_logging_resume_where_it_stopped(shards, base_run, run, capfd):
    result = train(
        tiny_config(shards, train__steps=5, train__log_every=1, train__checkpoint_every=5), run
    )
    assert "resumed from step 3 of 5" in capfd.readouterr().err
    assert result["step"] == 5
    records = _records(run)
    assert sorted(records) == [1, 2, 3, 4, 5]
    # Steps 1-3 are the first run's (not trained again); the data goes on from where it stood.
    assert [records[s] for s in (1, 2, 3)] == [_records(base_run)[s] for s in (1, 2, 3)]
    assert records[3]["epoch"] < records[4]["epoch"] < records[5]["epoch"]
    history = [json.loads(ln) for ln in (run / wd.HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 3]
    assert history[-1]["config"]["train"]["steps"] == 5
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "5"]


def test_allow_config_change_keeps_the_state_and_restarts_the_data(shards, run, caplog):
    caplog.set_level(logging.WARNING)
    result = train(
        tiny_config(
            shards, train__steps=4, data__shuffle_buffer=32, train__allow_config_change=True
        ),
        run,
    )
    assert result["step"] == 4
    assert "data.shuffle_buffer 64 -> 32" in caplog.text
    assert "the data starts from its beginning" in caplog.text
    records = _records(run)
    assert sorted(records) == [1, 2, 3, 4]
    # The new data started from its beginning: one step into it is less than three of the old.
    assert records[4]["epoch"] < records[3]["epoch"]


def test_a_run_past_its_steps_has_nothing_to_do(shards, run, capfd):
    before = _snapshot(run)
    result = train(tiny_config(shards, train__steps=3), run)
    assert result == {"step": 3, "nothing_to_do": True}
    assert "nothing to do: checkpoint 3 >= config.train.steps=3" in capfd.readouterr().err
    assert _snapshot(run) == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(shards, run, caplog):
    caplog.set_level(logging.WARNING)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.')  # killed mid-write
    train(tiny_config(shards, train__steps=4), run)
    assert "metrics.jsonl:4 is not a whole record" in caplog.text
    assert sorted(_records(run)) == [1, 2, 3, 4]


# ---------------------------------------------------------------- one run per workdir


def test_a_locked_workdir_is_refused(shards, run):
    before = _snapshot(run)
    with wd.locked(run):
        with pytest.raises(
            ConfigError, match=f"{run} is in use by process .* one train per workdir"
        ):
            train(tiny_config(shards, train__steps=6), run)
    assert _snapshot(run) == before
    train(tiny_config(shards, train__steps=4), run)  # released: the next run may go on


def test_a_run_that_fails_before_its_first_step_leaves_no_new_workdir(shards, tmp_path):
    workdir = tmp_path / "new" / "run"
    with pytest.raises(InputError, match="does not exist"):
        train(tiny_config(shards, train__init_from=str(tmp_path / "missing")), workdir)
    assert not workdir.exists()


# ---------------------------------------------------------------- what readers see


def test_one_listing_of_finished_steps(tmp_path):
    """A finished step is a directory named by its number; orbax's in-flight
    `<step>.orbax-checkpoint-tmp-*`, files and other names are not steps, for any reader."""
    root = tmp_path / wd.CHECKPOINTS
    for name in ("3", "12", "7.orbax-checkpoint-tmp-1700000000", "corrupt", "tmp"):
        (root / name).mkdir(parents=True)
    (root / "5").write_text("")  # a file, not a step
    assert wd.finished_steps(root) == [3, 12]
    assert Checkpointer.steps_in(tmp_path) == [3, 12]  # what train's resume check sees
    assert wd.step_directory(tmp_path, None) == (12, root / "12")  # to-hf and generate
    with pytest.raises(InputError, match=r"no checkpoint for step 7 in .* \(available: 3, 12\)"):
        wd.step_directory(tmp_path, 7)
    assert wd.previous_step_hint(root, 12) == "; the previous one is step 3 (--step=3)"
    assert wd.previous_step_hint(root, 3) == ""
    assert wd.finished_steps(tmp_path / "nope") == []
    with pytest.raises(InputError, match="no checkpoint with params under"):
        wd.step_directory(tmp_path / "nope", None)


def test_readers_skip_a_save_in_flight_and_name_a_damaged_step(run, tmp_path, caplog):
    """An unfinished save is invisible; a finished step whose items are gone is listed, so it is
    named (to-hf) or skipped with a warning (the latest params), never silently passed over."""
    from polyglot_jax.hf.convert import to_hf

    caplog.set_level(logging.WARNING)
    checkpoints = run / wd.CHECKPOINTS
    shutil.copytree(checkpoints / "3", checkpoints / "9.orbax-checkpoint-tmp-1700000000")
    (checkpoints / "5").mkdir()
    assert Checkpointer.steps_in(run) == [3, 5]
    cfg = ModelConfig.from_config(wd.load_run_config(run).model)
    assert load_params(run, None, cfg)["embed_in"].shape == (cfg.vocab_size, cfg.d_model)
    assert f"checkpoint {checkpoints / '5'} cannot be read" in caplog.text
    with pytest.raises(
        InputError,
        match=r"checkpoints/5/params/_METADATA: .*; the previous one is step 3 \(--step=3\)",
    ):
        to_hf(run, tmp_path / "hf", show_progress=False)
    to_hf(run, tmp_path / "hf", step=3, show_progress=False)


def test_run_tokenizer_falls_back_to_the_shards_manifest(tmp_path):
    """A run that does not name its tokenizer exports the one its shards were made with."""
    shards = tiny_shards(tmp_path / "cache")
    config = tiny_config(shards)
    assert not config.data.tokenizer
    recorded = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    assert wd.run_tokenizer(config, tmp_path) == pathlib.Path(recorded)
    config.data.shards = ("builtin",)
    assert wd.run_tokenizer(config, tmp_path) is None
