"""Log-likelihood of continuations, as lm-evaluation-harness scores multiple-choice tasks.

For a request (context ids, continuation ids) the model reads `(context + continuation)[:-1]`,
left-truncated to its `max_len` (the harness's `[-(max_length + 1):][:-1]`), and the result is
the summed float32 log-probability of the continuation's tokens and whether each of them is the
argmax (`is_greedy`).

Requests are packed (`pack`): sorted longest first, laid one after another into rows of a few
bucket lengths (at least `pack_len`), each its own segment with positions from 0, so attention
never crosses requests and the result is the request's alone; a COPA request of 19 tokens shares
a 256-token row with a dozen others instead of padding a row of 32 alone. Only the
continuations' positions reach the vocabulary projection. A whole task compiles once per
(row length, rows, span) shape; rows are sharded over the mesh's batch axes.
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

PACK_LEN = 256  # shortest row: short requests share it (attention over 256 keys stays cheap)


def length_bucket(n: int, window: int) -> int:
    """The padded length of a row whose longest request has n tokens: a multiple of 16 up to 256,
    of 256 above (at most 8 more shapes up to 2,048), never past `window`."""
    step = 16 if n <= 256 else 256
    return min(max(step, -(-n // step) * step), window)


def span_bucket(n: int) -> int:
    """Continuation positions scored per row: n rounded up in quarter-octave steps (at most 25%
    wasted vocabulary projections, four shapes per doubling)."""
    step = max(8, bucket(n) // 4)
    return -(-n // step) * step


def pack(
    lengths: Sequence[int],
    *,
    window: int,
    batch_tokens: int,
    pack_len: int = PACK_LEN,
    row_multiple: int = 1,
) -> list[tuple[int, list[list[int]]]]:
    """Packs requests of `lengths` (model inputs, each <= window) into calls.

    Returns [(row length, rows)], each row the indices of the requests laid in it, in order.
    Longest first, next fit: a call's row length is the bucket of its longest request (at least
    `pack_len`, at most `window`); it takes `batch_tokens // length` rows (a multiple of
    `row_multiple`); a request goes into the current row while it fits, else opens the next.
    `pack_len=0` puts one request in each row (an attention without segment masks).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls, i = [], 0
    while i < len(order):
        length = max(min(pack_len, window), length_bucket(lengths[order[i]], window))
        per_call = max(1, batch_tokens // length)
        per_call = max(row_multiple, per_call // row_multiple * row_multiple)
        rows: list[list[int]] = [[]]
        used = 0
        while i < len(order):
            n = lengths[order[i]]
            if rows[-1] and (used + n > length or not pack_len):
                if len(rows) == per_call:
                    break
                rows.append([])
                used = 0
            rows[-1].append(order[i])
            used += n
            i += 1
        calls.append((length, rows))
    return calls


@functools.lru_cache(maxsize=32)
def score_fn(cfg: ModelConfig, row: NamedSharding, packed: bool):
    """Jitted (params, tokens, positions, segments [rows, length], at, targets [rows, span]) ->
    (float32 log-prob, greedy) [rows, span] of each scored position. Only the `span` positions
    `at` (the row's continuations, padded) go through the output projection: a few-shot context
    of 2,000 tokens scoring a 2-token answer needs 2 rows of vocabulary logits, not 2,000."""
    model = GPTNeoX(cfg)

    def score(params, tokens, positions, segments, at, targets):
        hidden = model.apply(
            {"params": params},
            tokens,
            positions=positions,
            segment_ids=segments if packed else None,
            return_hidden=True,
        )
        picked_hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
        logits = lm_head(picked_hidden, lm_head_kernel(params), jnp.float32)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        greedy = target >= jnp.max(logits, axis=-1)  # argmax (ties count as greedy)
        return target - jax.nn.logsumexp(logits, axis=-1), greedy

    # Results replicated: with a mesh over several processes each of them reads every row.
    return jax.jit(score, in_shardings=(None,) + (row,) * 5, out_shardings=replicated(row))


class Scorer:
    """Scores (context, continuation) id pairs with `params` of `cfg` (as generate_weights loads
    them); `batch_tokens` bounds rows x row length per call; `pack_len` as in `pack` (packing
    needs segment masks, which `attention_impl='cudnn'` lacks: there each request has a row)."""

    def __init__(
        self,
        params: Any,
        cfg: ModelConfig,
        *,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, Any]] = (),
        batch_tokens: int = 2048,
        pack_len: int = PACK_LEN,
    ):
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"batch_tokens={batch_tokens!r} must be a positive int")
        if not isinstance(pack_len, int) or pack_len < 0:
            raise ConfigError(f"pack_len={pack_len!r} must be a non-negative int")
        self.params, self.cfg = params, cfg
        self.mesh, self.rules, self.row_sharding, self.row_multiple = row_placement(mesh, rules)
        self.batch_tokens = batch_tokens
        self.pack_len = 0 if cfg.attention_impl == "cudnn" else pack_len

    def requests_to_rows(self, requests) -> list[tuple[list[int], list[int], int]]:
        """(inputs, targets, continuation length) of each request, checked and left-truncated."""
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
            rows.append((whole[:-1], whole[1:], len(continuation)))
        return rows

    def pack(self, rows) -> list[tuple[int, list[list[int]]]]:
        """`pack` of `requests_to_rows`' rows under this scorer's budget and mesh."""
        return pack(
            [len(inputs) for inputs, *_ in rows],
            window=self.cfg.max_len,
            batch_tokens=self.batch_tokens,
            pack_len=self.pack_len,
            row_multiple=self.row_multiple,
        )

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, progress: bool = False
    ) -> list[tuple[float, bool]]:
        """(summed log-probability, is_greedy) of each continuation given its context."""
        rows = self.requests_to_rows(requests)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with (
            jax.set_mesh(self.mesh),
            nn.logical_axis_rules(self.rules),
            tqdm(
                total=len(rows), desc="score", unit="req", disable=None if progress else True
            ) as bar,
        ):
            for length, call in self.pack(rows):
                results_of_call = self._score([[rows[i] for i in r] for r in call], length)
                for r, row in enumerate(call):
                    for i, value in zip(row, results_of_call[r], strict=True):
                        results[i] = value
                bar.update(sum(map(len, call)))
        return results

    def call_shape(self, call, length: int) -> tuple[int, int]:
        """(rows, span) of the arrays one call computes: rows padded to few shapes within the
        budget and to the mesh's row multiple, span to the largest row's continuation tokens."""
        per_call = max(1, self.batch_tokens // length)
        n = min(bucket(len(call), 1), max(per_call, len(call)))  # few shapes, within budget
        n = -(-n // self.row_multiple) * self.row_multiple
        return n, span_bucket(max(sum(cont for *_, cont in row) for row in call))

    def _score(self, call, length: int) -> list[list[tuple[float, bool]]]:
        n, span = self.call_shape(call, length)
        tokens = np.zeros((n, length), np.int32)
        positions = np.zeros((n, length), np.int32)
        segments = np.zeros((n, length), np.int32)  # 0: padding
        at = np.zeros((n, span), np.int32)
        targets = np.zeros((n, span), np.int32)
        for r, row in enumerate(call):
            start = scored = 0
            for s, (inputs, outputs, cont) in enumerate(row, start=1):
                stop = start + len(inputs)
                tokens[r, start:stop] = inputs
                positions[r, start:stop] = np.arange(len(inputs))
                segments[r, start:stop] = s
                at[r, scored : scored + cont] = np.arange(stop - cont, stop)
                targets[r, scored : scored + cont] = outputs[len(outputs) - cont :]
                start, scored = stop, scored + cont
        logprob, greedy = jax.device_get(
            score_fn(self.cfg, self.row_sharding, self.pack_len > 0)(
                self.params,
                *(
                    host_to_global(x, self.row_sharding)
                    for x in (tokens, positions, segments, at, targets)
                ),
            )
        )
        out = []
        for r, row in enumerate(call):
            values, scored = [], 0
            for *_, cont in row:
                picked = slice(scored, scored + cont)
                values.append((float(np.sum(logprob[r, picked])), bool(np.all(greedy[r, picked]))))
                scored += cont
            out.append(values)
        return out
