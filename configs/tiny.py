"""A tiny GPT-NeoX that trains in seconds on CPU: the demo's and the tests' model.

Head count 4 and the vocab divide every 8-device layout with a model axis up to 4.
"""

from polyglot_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.d_ff = 256
    c.model.num_heads = 4  # head_dim 16
    c.model.rotary_dim = 8  # rotary_pct 0.5, as in the 1.3B model
    c.model.vocab_size = 4096  # the built-in sample's tokenizer vocab (a multiple of 128)
    c.model.max_len = 128
    c.model.dtype = (
        "float32"  # CPU: bfloat16 matmuls are slow there and float32 keeps resume bit-exact
    )

    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
