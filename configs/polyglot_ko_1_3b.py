"""Polyglot-Ko 1.3B: the architecture of EleutherAI/polyglot-ko-1.3b (report Table 2).

Parameters: 1,331,810,304 (report Table 2, matched exactly).
"""

from polyglot_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 24  # report Table 2
    c.model.d_model = 2048
    c.model.d_ff = 8192  # 4 x d_model
    c.model.num_heads = 16  # head_dim 128
    c.model.rotary_dim = 64  # rotary_pct 0.5 of head_dim 128
    c.model.vocab_size = 30080  # 30,003 tokens padded to a multiple of 128
    c.model.max_len = 2048

    # The report's training setup: 102,000 steps x 1024 sequences x 2048 tokens
    # = 214B tokens (the report says 213B).
    c.train.steps = 102000
    c.train.batch_size = 1024
    c.train.seq_len = 2048
    # Ours (the report gives no optimizer values): GPT-NeoX/Pythia-style AdamW at this size,
    # 1% warmup, cosine to 10%, and microbatches sized for one node of 8 x 80 GB GPUs.
    c.train.lr = 0.0002
    c.train.warmup_steps = 1020
    c.train.grad_accum = 16
    c.model.remat_policy = "dots"

    # ZeRO-3 style by default: parameters and optimizer state sharded over all devices of a node.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
