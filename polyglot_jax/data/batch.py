"""The batch the pipeline yields and the trainer consumes, and the rule for which targets count.

    local = next(it)            # LocalBatch: this process's rows and how far through its data it is
    local.batch                 # Batch of numpy arrays, [local_batch, ...] each
    local.epoch, local.epochs   # float64 (see pipeline.py)

A row holds `seq_len + 1` tokens: the model reads tokens 0..seq_len-1 of it and predicts 1..seq_len.
`loss_mask` says which of those predictions count; it is the only place that rule is written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def loss_mask(tokens: Any, segment_ids: Any = None) -> Any:
    """bool [rows, seq_len]: whether the prediction of token t + 1 from token t counts in the loss
    (numpy for numpy rows; in the train step, computed there from the rows it gets).

    Concat rows (`segment_ids` None): every prediction. Packed rows: a prediction counts when its
    target continues the segment of its input and is not padding (segment id 0), so there is no
    loss across the start of a document piece and none on the tail a row could not fill."""
    if segment_ids is None:
        xp = np if isinstance(tokens, np.ndarray) else jnp
        return xp.ones((tokens.shape[0], tokens.shape[1] - 1), bool)
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows of `seq_len + 1` tokens; a pytree (numpy arrays on the host, global `jax.Array`s in the
    train step; the fields a concat batch lacks are None and have no leaves).

    tokens:      int32 [rows, seq_len + 1].
    segment_ids: int32 [rows, seq_len + 1], packed rows only: the pieces of a row are numbered
                 1, 2, 3, ...; padding is 0 (with token 0, `<pad>` in Polyglot-Ko).
    positions:   int32 [rows, seq_len + 1], packed rows only: restart at 0 with each piece.
    """

    tokens: Any
    segment_ids: Any = None
    positions: Any = None

    def model_inputs(self) -> tuple[Any, Any, Any]:
        """(tokens, positions, segment_ids) [rows, seq_len] as `GPTNeoX.__call__` takes them
        (positions and segment_ids None for concat rows: positions 0, 1, ... and one segment)."""
        if self.segment_ids is None:
            return self.tokens[:, :-1], None, None
        return self.tokens[:, :-1], self.positions[:, :-1], self.segment_ids[:, :-1]

    @property
    def targets(self) -> Any:
        """int32 [rows, seq_len]: the token each input position predicts."""
        return self.tokens[:, 1:]

    @property
    def loss_mask(self) -> Any:
        """bool [rows, seq_len]: which predictions count (`loss_mask`)."""
        return loss_mask(self.tokens, self.segment_ids)


@dataclasses.dataclass(frozen=True)
class LocalBatch:
    """What the pipeline's iterator yields: this process's rows, and how far through its data it is
    (epochs completed + the fraction of the current one; see pipeline.py for how it is counted)."""

    batch: Batch  # numpy, [local_batch, ...]
    epoch: np.float64  # for the corpus furthest through its data (the max of `epochs`)
    epochs: np.ndarray  # float64 [num_corpora], each corpus's own
