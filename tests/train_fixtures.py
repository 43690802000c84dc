"""A tiny tokenized corpus and tiny configs for trainer tests (built in seconds, once per session)."""

from __future__ import annotations

import os
import pathlib

from polyglot_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_shards(cache_dir: pathlib.Path) -> pathlib.Path:
    """konlpy's corpora + 2,000 NSMC reviews (when present), tokenized with a 4,096-token BBPE."""
    from polyglot_jax.data.sample import prepare_builtin_sample

    return prepare_builtin_sample(cache_dir, nsmc_limit=2000)


def tiny_config(shards: pathlib.Path, **overrides):
    """configs/tiny.py made smaller still: a few steps of 16 x 32 tokens, logging every step."""
    c = load_config(str(REPO / "configs" / "tiny.py"))
    c.model.d_model = 64
    c.model.d_ff = 128
    c.model.rotary_dim = 8
    c.train.steps = 6
    c.train.batch_size = 16
    c.train.seq_len = 32
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.train.async_checkpoints = False
    c.data.shards = (str(shards),)
    c.data.shuffle_buffer = 64
    c.data.prefetch = 0
    # In-process runs share the test session's cache (conftest.py), when it has one: the first
    # run's choice holds for the whole process, and the default would be the run's workdir.
    c.train.compilation_cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "off"
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c
