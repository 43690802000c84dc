"""Log-likelihood of continuations, as lm-evaluation-harness scores multiple-choice tasks.

For a request (context ids, continuation ids) the model reads `(context + continuation)[:-1]`,
left-truncated to its `max_len` (the harness's `[-(max_length + 1):][:-1]`), and the result is
the summed float32 log-probability of the continuation's tokens and whether each of them is the
argmax (`is_greedy`).

Requests are packed (`pack`): sorted longest first, laid one after another into rows of a few
bucket lengths (at least `pack_len`), each its own segment with positions from 0, so attention
never crosses requests and the result is the request's alone; a COPA request of 19 tokens shares
a 256-token row with a dozen others instead of padding a row of 32 alone. Requests with the same
context (a multiple-choice document's choices) share it (`share_contexts`): the context is laid
once and each continuation after it as a branch of a prefix tree that sees the context and
itself only (`attention.causal_mask`), at the positions it would have alone, so a 5-shot BoolQ
document's 1,500 context tokens are computed once, not once per choice. Only the continuations'
positions reach the vocabulary projection. A whole task compiles once per shape (row length,
rows, projected positions, scored tokens); rows are sharded over the mesh's batch axes.
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
    """Positions projected onto the vocabulary per block of rows: n rounded up to a multiple of
    an eighth of the power of two at or above it (four shapes per doubling; at most 25% wasted
    projections, just above a power of two)."""
    step = max(8, bucket(n) // 8)
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


def trunk_length(row) -> int:
    """A row's context through its last token: the position that predicts the continuation's
    first token (a row is `(inputs, outputs, continuation length)`)."""
    inputs, _, cont = row
    return len(inputs) - cont + 1


def share_contexts(rows, window: int) -> list[list[int]]:
    """Groups of `Scorer.requests_to_rows`' rows (indices; groups in order of first appearance)
    whose inputs start with the same trunk: the context up to its last token, the position that
    predicts the continuation's first token. A group's trunk and its members' rests (each
    continuation but its last token) fit `window`; a member that would not opens a new group."""
    open_group: dict[tuple[int, ...], int] = {}  # trunk -> the group that takes its next member
    groups: list[list[int]] = []
    lengths: list[int] = []
    for i, (inputs, _, cont) in enumerate(rows):
        trunk = trunk_length(rows[i])
        key = tuple(inputs[:trunk])
        g = open_group.get(key)
        if g is None or lengths[g] + cont - 1 > window:
            open_group[key] = g = len(groups)
            groups.append([])
            lengths.append(trunk)
        groups[g].append(i)
        lengths[g] += cont - 1
    return groups


def group_length(rows, group: Sequence[int]) -> int:
    """Tokens a group of rows takes laid as a prefix tree: its trunk once, then each rest."""
    trunk = trunk_length(rows[group[0]])
    return trunk + sum(len(rows[i][0]) - trunk for i in group)


@functools.lru_cache(maxsize=32)
def score_fn(cfg: ModelConfig, row: NamedSharding, packed: bool):
    """Jitted (params, tokens, positions, segments, at, pick, targets) -> (float32 log-prob,
    greedy) [blocks, picks] of each scored token.

    tokens, positions: int32 [rows, length]; segments: int32 [rows, length] (or [rows, length, 2]:
    segment and branch of `attention.causal_mask`'s prefix trees). The rows are `blocks` equal
    blocks (one per shard of the row axis); `at` int32 [blocks, span] are positions in a block's
    rows read as one sequence, the only ones that go through the vocabulary projection (a
    few-shot context of 2,000 tokens scoring a 2-token answer needs 2 rows of vocabulary
    logits, not 2,000; a context's last position, which scores every choice's first token, only
    once). `pick`, `targets` int32 [blocks, picks]: each scored token's index into `at` and its
    id. `packed=False`: one request per row, no segments (cudnn)."""
    model = GPTNeoX(cfg)

    def score(params, tokens, positions, segments, at, pick, targets):
        hidden = model.apply(
            {"params": params},
            tokens,
            positions=positions,
            segment_ids=segments if packed else None,
            return_hidden=True,
        )
        blocks = hidden.reshape(at.shape[0], -1, hidden.shape[-1])
        picked_hidden = jnp.take_along_axis(blocks, at[..., None], axis=1)
        logits = lm_head(picked_hidden, lm_head_kernel(params), jnp.float32)  # [blocks, span, V]
        block = jnp.arange(at.shape[0])[:, None]
        target = logits[block, pick, targets]
        greedy = target >= jnp.max(logits, axis=-1)[block, pick]  # argmax (ties count as greedy)
        return target - jax.nn.logsumexp(logits, axis=-1)[block, pick], greedy

    # Results replicated: with a mesh over several processes each of them reads every row.
    return jax.jit(score, in_shardings=(None,) + (row,) * 6, out_shardings=replicated(row))


class Scorer:
    """Scores (context, continuation) id pairs with `params` of `cfg` (as generate_weights loads
    them); `batch_tokens` bounds rows x row length per call; `pack_len` as in `pack` (packing
    needs segment masks, which `attention_impl='cudnn'` lacks: there each request has a row);
    `share_contexts`: requests with one context share it (needs the prefix-tree mask: `xla`
    attention only; elsewhere each request lays its own)."""

    def __init__(
        self,
        params: Any,
        cfg: ModelConfig,
        *,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, Any]] = (),
        batch_tokens: int = 2048,
        pack_len: int = PACK_LEN,
        share_contexts: bool = True,
    ):
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"batch_tokens={batch_tokens!r} must be a positive int")
        if not isinstance(pack_len, int) or pack_len < 0:
            raise ConfigError(f"pack_len={pack_len!r} must be a non-negative int")
        self.params, self.cfg = params, cfg
        self.mesh, self.rules, self.row_sharding, self.row_multiple = row_placement(mesh, rules)
        self.batch_tokens = batch_tokens
        self.pack_len = 0 if cfg.attention_impl == "cudnn" else pack_len
        self.shares_contexts = share_contexts and self.pack_len > 0 and cfg.attention_impl == "xla"

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

    def groups(self, rows) -> list[list[int]]:
        """The rows laid together as one prefix tree (`share_contexts`), else one per group."""
        if self.shares_contexts:
            return share_contexts(rows, self.cfg.max_len)
        return [[i] for i in range(len(rows))]

    def pack(self, rows, groups) -> list[tuple[int, list[list[int]]]]:
        """`pack` of the groups of `requests_to_rows`' rows under this scorer's budget and mesh:
        [(row length, rows)], each row the indices of the groups laid in it."""
        return pack(
            [group_length(rows, g) for g in groups],
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
        groups = self.groups(rows)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with (
            jax.set_mesh(self.mesh),
            nn.logical_axis_rules(self.rules),
            tqdm(
                total=len(rows), desc="score", unit="req", disable=None if progress else True
            ) as bar,
        ):
            for length, call in self.pack(rows, groups):
                laid = [[[rows[i] for i in groups[g]] for g in row] for row in call]
                for row, values in zip(call, self._score(laid, length), strict=True):
                    members = [i for g in row for i in groups[g]]
                    for i, value in zip(members, values, strict=True):
                        results[i] = value
                    bar.update(len(members))
        return results

    def layout(self, call, length: int) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
        """The arrays of one call (`score_fn`'s inputs by name) and, for each request in order,
        (block, first pick, continuation length). `call`: rows of groups of `requests_to_rows`'
        rows. Rows are padded to few shapes within the budget and to the mesh's row multiple,
        `at` and `pick` to `span_bucket`s of the largest block's."""
        per_call = max(1, self.batch_tokens // length)
        n = min(bucket(len(call), 1), max(per_call, len(call)))  # few shapes, within budget
        n = -(-n // self.row_multiple) * self.row_multiple
        per_block = n // self.row_multiple
        tokens = np.zeros((n, length), np.int32)
        positions = np.zeros((n, length), np.int32)
        segments = np.zeros((n, length, 2), np.int32)  # (segment, branch); segment 0: padding
        at = [[] for _ in range(self.row_multiple)]  # per block: positions to project
        pick = [[] for _ in range(self.row_multiple)]  # per block: (index into at, target)
        where = []
        for r, row in enumerate(call):
            block, base = r // per_block, (r % per_block) * length  # base: in block's sequence
            projected, picked = at[block], pick[block]
            col = 0
            for s, group in enumerate(row, start=1):
                inputs = group[0][0]
                trunk = trunk_length(group[0])
                tokens[r, col : col + trunk] = inputs[:trunk]
                positions[r, col : col + trunk] = np.arange(trunk)
                segments[r, col : col + trunk] = (s, 0)
                col += trunk
                last = len(projected)
                projected.append(base + col - 1)  # the trunk's last token: every first token's
                for b, (inputs, outputs, cont) in enumerate(group, start=1):
                    # A branch: the continuation but its last token, predicting the rest.
                    stop = col + cont - 1
                    tokens[r, col:stop] = inputs[trunk:]
                    positions[r, col:stop] = np.arange(trunk, len(inputs))
                    segments[r, col:stop] = (s, b)
                    where.append((block, len(picked), cont))
                    scored = [last, *range(len(projected), len(projected) + cont - 1)]
                    picked.extend(zip(scored, outputs[len(outputs) - cont :], strict=True))
                    projected.extend(range(base + col, base + stop))
                    col = stop
        span = span_bucket(max(map(len, at)))
        picks = span_bucket(max(map(len, pick)))
        arrays = {
            "tokens": tokens,
            "positions": positions,
            "segments": segments if self.shares_contexts else segments[..., 0],
            "at": np.zeros((self.row_multiple, span), np.int32),
            "pick": np.zeros((self.row_multiple, picks), np.int32),
            "targets": np.zeros((self.row_multiple, picks), np.int32),
        }
        for block, (projected, picked) in enumerate(zip(at, pick, strict=True)):
            arrays["at"][block, : len(projected)] = projected
            if picked:
                index, target = zip(*picked, strict=True)
                arrays["pick"][block, : len(picked)] = index
                arrays["targets"][block, : len(picked)] = target
        return arrays, where

    def _score(self, call, length: int) -> list[list[tuple[float, bool]]]:
        """Results of each row's requests, in order: `call` is rows of groups of rows."""
        arrays, where = self.layout(call, length)
        logprob, greedy = jax.device_get(
            score_fn(self.cfg, self.row_sharding, self.pack_len > 0)(
                self.params, *(host_to_global(x, self.row_sharding) for x in arrays.values())
            )
        )
        values = iter(
            (float(np.sum(logprob[b, p : p + cont])), bool(np.all(greedy[b, p : p + cont])))
            for b, p, cont in where
        )
        return [[next(values) for group in row for _ in group] for row in call]
