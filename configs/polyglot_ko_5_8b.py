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

    # The report's training setup: 320,000 steps x 256 sequences x 2048 tokens
    # = 168B tokens (the report says 172B).
    c.train.steps = 320000
    c.train.batch_size = 256
    c.train.seq_len = 2048
    # Ours (the report gives no optimizer values): GPT-NeoX/Pythia-style AdamW at this size,
    # 1% warmup, cosine to 10%, and microbatches sized for one node of 8 x 80 GB GPUs.
    c.train.lr = 0.00012
    c.train.warmup_steps = 3200
    c.train.grad_accum = 8
    c.model.remat_policy = "full"

    # ZeRO-3 style by default: parameters and optimizer state sharded over all devices of a node.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
