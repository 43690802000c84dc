"""The preprocess stages as datatrove PipelineSteps, each calling the same code as local runs, and
the base every stage step shares (`Stage`: the run's layout, logging, a stats file per task).

    stage     tasks      step(s)                                 reads -> writes (under work/)
    clean     T          ReadInputs -> ApplyRules -> Signatures  inputs -> texts, docs, gids,
                                                                 sigs, exact, bands (per rank)
    exact     T          ExactDuplicates                         exact -> exact_removed
    buckets   bands * k  MinhashBuckets                          bands -> edges, nodes
    clusters  1          MinhashClusters                         nodes, edges -> clusters
    resolve   T          MinhashResolve                          clusters, sigs -> near_removed
    filter    T          KeptDocuments                           docs, *_removed -> kept
    plan      1          PlanShards                              kept -> shards.json
    write     T          WriteShards                             shards.json, kept, texts ->
                                                                 clean/part-*, tokens/shard-*
    manifest  1          WriteManifest                           -> tokens/manifest.json,
                                                                 clean/report.json

One implementation of the rules: `ApplyRules` is a datatrove `BaseFilter` whose `filter` is
`polyglot_jax.data.clean.clean_text`; `Signatures` computes `exact_key` and
`MinHasher.signatures` (dedup.py) exactly as local `clean`'s workers do; `MinhashResolve` decides
with `NearDuplicateIndex` itself; `WriteShards` tokenizes and writes through tokenize.py.

The same documents are removed as by local `clean`, which keeps a document unless an earlier
kept one is a duplicate of it:
- exact: a document whose `exact_key` an earlier one had is removed (`exact` keeps the smallest
  gid of each key, i.e. the first in input order);
- near: local `clean` feeds every document that passed exact dedup, in input order, to one
  `NearDuplicateIndex`; a document's decision depends only on documents sharing one of its LSH
  bands, so it depends only on its connected component of the "shares a band" graph. `buckets`
  finds that graph (a chain through each band bucket: linear in its size), `clusters` its
  components, and `resolve` runs `NearDuplicateIndex` over each partition of components in gid
  order: the same decisions. (Exact duplicates go through it as well: they carry the signature
  of their first copy, so they are never kept and change no decision; they count as `exact`.)
The one difference: band buckets here are a 64-bit hash of the band's values, the local index
uses Python's (also 64-bit) `hash` of its bytes. Both only matter on a hash collision.

Why not datatrove's own MinhashDedupSignature/Buckets/Cluster/Filter (0.10.1): they define "near
duplicate" differently (word 5-grams of `simplify_text` through a language word tokenizer, 64-bit
Mersenne hashing, 14 x 8 bands, no check of the estimated Jaccard) and remove every member of a
transitive cluster but its union-find root (chosen by union by size, not input order): A ~ B ~ C
removes C even when A and C are not similar, which local `clean` keeps. These stages keep their
structure (sorted signature runs per rank and band, a bucket merge per band range, one
clustering task, a per-rank filter) with our shingles, bands and decisions.

Where the steps are: `steps_clean.py` (clean), `steps_dedup.py` (exact, buckets, clusters,
resolve, filter), `steps_output.py` (plan, write, manifest).
"""

from __future__ import annotations

import resource
import time
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from polyglot_jax.data.engine import layout as lay
from polyglot_jax.data.engine.merge import BATCH_ROWS


def _reset_peak_rss() -> float:
    """Resets this process's peak RSS (Linux: /proc/self/clear_refs) and returns the RSS (MB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Timer:
    """Task wall time, CPU time and the process's peak RSS since `start`."""

    def start(self) -> None:
        self.rss_start_mb = _reset_peak_rss()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def report(self) -> dict[str, float]:
        return {
            "seconds": round(time.perf_counter() - self.t0, 3),
            "cpu_seconds": round(time.process_time() - self.c0, 3),
            "rss_start_mb": self.rss_start_mb,
            "peak_rss_mb": _status_mb("VmHWM"),
        }


class Stage(PipelineStep):
    """A stage step that knows the run's layout and writes `work/stats/STAGE/RANK.json`.

    A step that reads no documents implements `work` (its task, returning its counts); `run`
    times it and writes the counts. Steps of a document pipeline override `run` instead."""

    type = "🇰🇷 - POLYGLOT"
    stage = ""

    def __init__(self, output: str, plan: dict[str, Any]) -> None:
        super().__init__()
        self.output, self.plan = str(output), plan
        self._layout: lay.Layout | None = None

    quiet = False  # set by the driver: datatrove's console logs off (its log files too)

    def begin(self) -> Timer:
        """Starts the task: logging as the driver asked, then the timer."""
        from loguru import logger

        (logger.disable if self.quiet else logger.enable)("datatrove")
        timer = Timer()
        timer.start()
        return timer

    @property
    def merge_rows(self) -> int:
        """Rows a merge reads per round across all ranks (`preprocess(merge_rows=)`): with the
        task's own output, what bounds a dedup or plan task's memory."""
        return int(self.plan.get("merge_rows") or BATCH_ROWS)

    @property
    def layout(self) -> lay.Layout:
        if self._layout is None:
            self._layout = lay.Layout(self.output, self.plan)
        return self._layout

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        timer = self.begin()
        self.finish(rank, timer, self.work(rank, world_size))
        return
        yield  # a generator, as datatrove expects

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        """Task `rank` of `world_size`: does the stage's share and returns its counts."""
        raise NotImplementedError

    def finish(self, rank: int, timer: Timer, counts: dict[str, Any]) -> None:
        for key, value in counts.items():
            if isinstance(value, int) and not isinstance(value, bool):
                self.stat_update(key, value=value)
        lay.write_json(
            self.layout.stats(self.stage, rank),
            {"stage": self.stage, "rank": rank, **timer.report(), **counts},
        )
