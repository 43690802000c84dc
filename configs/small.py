"""A ~100M-parameter GPT-NeoX (GPT-2-small widths, 8 layers, Polyglot-Ko's vocabulary).

Big enough that parameters, optimizer state and activations all matter for memory, small enough to
compile on CPU in seconds: the model of the mesh-layout and planner tests (8 fake devices) and of
CPU benchmarks. 12 heads and batch 16 divide every 8-device layout with a model axis up to 4.
"""

from polyglot_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 8
    c.model.d_model = 768
    c.model.d_ff = 3072
    c.model.num_heads = 12  # head_dim 64
    c.model.rotary_dim = 16  # rotary_pct 0.25
    c.model.max_len = 512
    # vocab_size: the base's 30080 (Polyglot-Ko's 30,003 ids padded to a multiple of 128)

    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.seq_len = 512
    c.train.warmup_steps = 100
    c.train.loss_chunk = 256

    c.mesh.data = -1
    return c
