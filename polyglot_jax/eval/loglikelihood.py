"""Log-likelihood of continuations, as lm-evaluation-harness scores multiple-choice tasks.

For a request (context ids, continuation ids) the model reads `(context + continuation)[:-1]`,
left-truncated to its `max_len` (the harness's `[-(max_length + 1):][:-1]`), and the result is
the summed float32 log-probability of the continuation's tokens and whether each of them is the
argmax (`is_greedy`). Requests are sorted by length, right padded to a few bucket lengths
(`length_bucket`), and batched under a token budget, so a whole task compiles once per bucket; only
the continuation's positions reach the vocabulary projection; rows are sharded over the mesh's
batch axes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.generate import bucket
from polyglot_jax.model import GPTNeoX, ModelConfig, lm_head, lm_head_kernel
from polyglot_jax.partitioning import host_to_global, replicated, row_placement


def length_bucket(n: int, window: int) -> int:
    """The padded length of a request of n tokens: a multiple of 16 up to 256 (short prompts like
    COPA's waste little), of 256 above (at most 8 more shapes up to 2,048), never past `window`."""
    step = 16 if n <= 256 else 256
    return min(max(step, -(-n // step) * step), window)


@functools.lru_cache(maxsize=32)
def score_fn(cfg: ModelConfig, row: NamedSharding):
    """Jitted (params, tokens [rows, length], at [rows, span], targets [rows, span], mask [rows,
    span]) -> (summed log-prob, all greedy) per row. Only the `span` positions `at` (the
    continuation's, padded) go through the output projection: a few-shot context of 2,000 tokens
    scoring a 2-token answer needs 2 rows of vocabulary logits, not 2,000."""
    model = GPTNeoX(cfg)

    def score(params, tokens, at, targets, mask):
        hidden = model.apply({"params": params}, tokens, return_hidden=True)
        picked_hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
        logits = lm_head(picked_hidden, lm_head_kernel(params), jnp.float32)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logprob = target - jax.nn.logsumexp(logits, axis=-1)
        greedy = target >= jnp.max(logits, axis=-1)  # argmax (ties count as greedy)
        total = jnp.sum(jnp.where(mask, logprob, 0.0), axis=-1)
        return total, jnp.all(greedy | ~mask, axis=-1)

    # Results replicated: with a mesh over several processes each of them reads every row.
    return jax.jit(score, in_shardings=(None, row, row, row, row), out_shardings=replicated(row))


class Scorer:
    """Scores (context, continuation) id pairs with `params` of `cfg` (as generate_weights loads
    them); `batch_tokens` bounds rows x bucket length per call."""

    def __init__(
        self,
        params: Any,
        cfg: ModelConfig,
        *,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, Any]] = (),
        batch_tokens: int = 2048,
    ):
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"batch_tokens={batch_tokens!r} must be a positive int")
        self.params, self.cfg = params, cfg
        self.mesh, self.rules, self.row_sharding, self.row_multiple = row_placement(mesh, rules)
        self.batch_tokens = batch_tokens

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, progress: bool = False
    ) -> list[tuple[float, bool]]:
        """(summed log-probability, is_greedy) of each continuation given its context."""
        window = self.cfg.max_len
        rows = []
        for n, (context, continuation) in enumerate(requests):
            if not continuation:
                raise InputError(f"request {n}: the continuation is empty")
            if not context:
                raise InputError(f"request {n}: the context is empty (start it with eos)")
            whole = [*context, *continuation]
            bad = [t for t in whole if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise InputError(
                    f"request {n}: id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})"
                )
            if len(continuation) > window:
                raise InputError(
                    f"request {n}: the continuation ({len(continuation)} tokens) is longer than "
                    f"the model's max_len {window}"
                )
            whole = whole[-(window + 1) :]
            rows.append((n, whole[:-1], whole[1:], len(continuation)))
        rows.sort(key=lambda r: -len(r[1]))  # longest first: similar lengths share a bucket
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with (
            jax.set_mesh(self.mesh),
            nn.logical_axis_rules(self.rules),
            tqdm(
                total=len(rows), desc="score", unit="req", disable=None if progress else True
            ) as bar,
        ):
            i = 0
            while i < len(rows):
                length = length_bucket(len(rows[i][1]), window)
                per_call = max(1, self.batch_tokens // length)
                per_call = max(self.row_multiple, per_call // self.row_multiple * self.row_multiple)
                chunk = rows[i : i + per_call]
                i += len(chunk)
                for (n, *_), value in zip(chunk, self._score(chunk, length), strict=True):
                    results[n] = value
                bar.update(len(chunk))
        return results

    def _score(self, chunk, length: int) -> list[tuple[float, bool]]:
        per_call = max(1, self.batch_tokens // length)
        n = min(bucket(len(chunk), 1), max(per_call, len(chunk)))  # few shapes, within budget
        n = -(-n // self.row_multiple) * self.row_multiple
        span = bucket(max(cont for *_, cont in chunk), 1)
        tokens = np.zeros((n, length), np.int32)
        at = np.zeros((n, span), np.int32)
        targets = np.zeros((n, span), np.int32)
        mask = np.zeros((n, span), bool)
        for r, (_, inputs, outputs, cont) in enumerate(chunk):
            tokens[r, : len(inputs)] = inputs
            at[r, :cont] = np.arange(len(outputs) - cont, len(outputs))
            targets[r, :cont] = outputs[len(outputs) - cont :]
            mask[r, :cont] = True
        total, greedy = jax.device_get(
            score_fn(self.cfg, self.row_sharding)(
                self.params,
                *(host_to_global(x, self.row_sharding) for x in (tokens, at, targets, mask)),
            )
        )
        return [(float(total[r]), bool(greedy[r])) for r in range(len(chunk))]
