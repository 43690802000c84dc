"""Data: cleaning, tokenizer training, tokenization to ArrayRecord shards, grain input pipelines."""
