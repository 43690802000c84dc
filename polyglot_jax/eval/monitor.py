"""The broken-generation monitor: a training hook that decodes fixed prompts greedily every
`config.eval.generation_every` steps and adds repetition metrics and the sample texts to the step's
metrics (metrics.jsonl, TensorBoard), warning when a continuation looks broken.

The report chose its 1.3B and 3.8B checkpoints by spotting generation that repeats itself near the
epoch boundary (loss drops sharply, then text loops); this flags it as it happens, beside the loss
watch's sudden-drop warning and the epoch fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from polyglot_jax.eval import repetition
from polyglot_jax.model import ModelConfig

GENERATION_KEYS = (
    "gen_seq_rep_4",
    "gen_rep_w_16",
    "gen_distinct_2",
    "gen_longest_repeat",
    "gen_broken_share",
)


class GenerationMonitor:
    """`hook(step, state, metrics)`: every `every` steps (and at `last_step`), greedy continuations
    of `prompts` (id lists) with the current params; adds `gen_*` values and `gen_samples` (the
    decoded texts, or id lists without a tokenizer) to `metrics`."""

    def __init__(
        self,
        cfg: ModelConfig,
        prompts: Sequence[Sequence[int]],
        *,
        every: int,
        last_step: int,
        max_new_tokens: int,
        mesh: Any,
        rules: Sequence[tuple[str, Any]],
        decode: Any = None,
    ):
        from polyglot_jax.generate_weights import decode_config

        self.cfg = decode_config(cfg, None)
        self.run_cfg = cfg
        self.prompts = [list(p) for p in prompts]
        self.every, self.last_step = every, last_step
        self.max_new_tokens = max_new_tokens
        self.mesh, self.rules = mesh, tuple(rules)
        self.decode = decode  # ids -> text, or None

    def _params(self, params: Any) -> Any:
        """The training params in the decode layout (layers unstacked, compute dtype), a copy."""
        from polyglot_jax.generate_weights import decode_params, param_shardings

        shardings = param_shardings(self.cfg, self.mesh, self.rules)
        return decode_params(dict(params), self.run_cfg, self.cfg, shardings)

    def wants_state(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def __call__(self, step: int, state: Any, metrics: dict[str, Any]) -> None:
        if not self.wants_state(step):
            return
        from polyglot_jax.generate import Generator, Sampling

        params = self._params(state.params)
        gen = Generator(params, self.cfg, mesh=self.mesh, rules=self.rules)
        results = gen.generate(
            self.prompts, Sampling(max_new_tokens=self.max_new_tokens, greedy=True)
        )
        del params
        seqs = [samples[0].ids for samples in results]
        summary = repetition.summary(seqs)
        metrics.update(
            gen_seq_rep_4=summary["seq_rep_4"],
            gen_rep_w_16=summary["rep_w_16"],
            gen_distinct_2=summary["distinct_2"],
            gen_longest_repeat=summary["longest_repeat"],
            gen_broken_share=summary["broken_share"],
            gen_samples=[self.decode(s) if self.decode else s for s in seqs],
        )
        if summary["broken_share"] > 0 and jax.process_index() == 0:
            limits = ", ".join(f"{k} > {v}" for k, v in repetition.THRESHOLDS.items())
            logging.warning(
                "step %d: %.0f%% of the monitor's greedy continuations repeat themselves (%s; "
                "seq_rep_4 %.2f, rep_w_16 %.2f, epoch %.3f): the report's broken generation",
                step,
                100 * summary["broken_share"],
                limits,
                summary["seq_rep_4"],
                summary["rep_w_16"],
                float(metrics.get("epoch", 0.0)),
            )

    def close(self) -> None:
        pass
