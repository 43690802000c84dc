"""A tiny GPT-NeoX that trains in seconds on CPU: the demo's and the tests' model.

Trains on the built-in Korean sample (konlpy's corpora + NSMC reviews when present), prepared into
a cache on first use. Head count 4, batch 16 and the vocab divide every 8-device layout with a
model axis up to 4.
"""

from polyglot_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.num_heads = 4  # head_dim 32
    c.model.rotary_dim = 16  # rotary_pct 0.5, as in the 1.3B model
    c.model.vocab_size = 4096  # the built-in sample's tokenizer vocab (a multiple of 128)
    c.model.max_len = 128
    c.model.dtype = (
        "float32"  # CPU: bfloat16 matmuls are slow there, and float32 keeps resume bit-exact
    )

    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.lr = 3e-3  # small models take large steps
    c.train.warmup_steps = 30
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.spike_halflife = 20

    c.data.shards = ("builtin",)
    c.data.shuffle_buffer = 256

    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
