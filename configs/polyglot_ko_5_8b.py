"""Polyglot-Ko 5.8B: the architecture of EleutherAI/polyglot-ko-5.8b (report Table 2).

Parameters: 5,885,059,072 (report Table 2, matched exactly).
"""

from polyglot_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 28  # report Table 2
    c.model.d_model = 4096
    c.model.d_ff = 16384  # 4 x d_model
    c.model.num_heads = 16  # head_dim 256
    c.model.rotary_dim = 64  # rotary_pct 0.25 of head_dim 256
    c.model.vocab_size = 30080  # 30,003 tokens padded to a multiple of 128
    c.model.max_len = 2048

    # ZeRO-3 style by default: parameters and optimizer state sharded over all devices of a node.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
