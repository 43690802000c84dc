"""polyglot_jax: pretrain the Polyglot-Ko family (GPT-NeoX) in JAX/Flax and hand it to Hugging Face."""

__version__ = "0.1.0"
