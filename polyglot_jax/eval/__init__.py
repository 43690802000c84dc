"""Evaluation: log-likelihood scoring, KoBEST, repetition metrics of generations (the
broken-generation monitor) and the lm-evaluation-harness model."""
