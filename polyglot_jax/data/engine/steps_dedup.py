"""The dedup stages (see steps.py for why they remove exactly the documents local `clean` removes):
the exact-key shuffle, the MinHash bucket graph, its components, the near-duplicate decisions
over them, and the per-rank filter that applies both kinds of removal.

    exact     ExactDuplicates    work/exact -> exact_removed
    buckets   MinhashBuckets     work/bands -> edges, nodes
    clusters  MinhashClusters    nodes, edges -> clusters
    resolve   MinhashResolve     clusters, sigs -> near_removed
    filter    KeptDocuments      docs, *_removed -> kept
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from polyglot_jax.data.clean import CleanConfig
from polyglot_jax.data.dedup import NearDuplicateIndex
from polyglot_jax.data.engine import layout as lay
from polyglot_jax.data.engine.merge import Records, key_range, merged
from polyglot_jax.data.engine.steps import Stage
from polyglot_jax.errors import InputError


def _save_removed(layout: lay.Layout, kind: str, task: int, gids: np.ndarray) -> None:
    """Writes the removed gids of each rank that has any (sorted)."""
    if not len(gids):
        return
    gids = np.sort(gids)
    ranks = layout.rank_of(gids)
    for rank in np.unique(ranks):
        lay.save_array(layout.removed(kind, int(rank), task), gids[ranks == rank])


def _load_removed(layout: lay.Layout, kind: str, rank: int) -> np.ndarray:
    directory = layout.removed(kind, rank, 0).parent
    if not directory.is_dir():
        return np.empty(0, np.uint64)
    parts = [lay.load_array(p) for p in sorted(directory.glob("*.npy"))]
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _read_rows(path: Path, rows: np.ndarray, num_perm: int) -> np.ndarray:
    """uint32 [len(rows), num_perm]: those rows of a signature file, read with pread (no memory
    map: a task holds the rows it asked for, not the pages around them)."""
    size = 4 * num_perm
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b"".join(os.pread(fd, size, int(row) * size) for row in rows)
    finally:
        os.close(fd)
    if len(data) != size * len(rows):
        raise InputError(f"{path}: shorter than its documents (re-run the clean stage)")
    return np.frombuffer(data, "<u4").reshape(len(rows), num_perm)


# --------------------------------------------------------------------- stage: exact dedup ---


class ExactDuplicates(Stage):
    """Task x of X merges every rank's sorted exact keys in its key range and removes every
    document but the first (smallest gid) of each key. Memory: one chunk per rank."""

    name = "🫂 exact duplicates"
    stage = "exact"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout = self.layout
        lo, hi = key_range(rank, world_size)
        streams = [Records(layout.exact(r)).restrict("hi", lo, hi) for r in range(layout.tasks)]
        removed, keys, documents = [], 0, 0
        for batch in merged(streams, "hi", ("hi", "lo", "gid"), rows=self.merge_rows):
            first = np.ones(len(batch), bool)
            first[1:] = (batch["hi"][1:] != batch["hi"][:-1]) | (
                batch["lo"][1:] != batch["lo"][:-1]
            )
            removed.append(batch["gid"][~first])
            keys += int(first.sum())
            documents += len(batch)
        removed_gids = np.concatenate(removed) if removed else np.empty(0, np.uint64)
        _save_removed(layout, "exact", rank, removed_gids)
        return {"documents": documents, "keys": keys, "removed": int(len(removed_gids))}


# ------------------------------------------------------------------ stage: MinHash buckets ---


class MinhashBuckets(Stage):
    """Task t works on band t // k, key range t % k: merges every rank's sorted band hashes and
    links the documents of each bucket in a chain (consecutive gids), so a bucket of m documents
    gives m - 1 edges. Memory: one chunk per rank."""

    name = "🎯 MinHash buckets"
    stage = "buckets"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout = self.layout
        per_band = int(self.plan["minhash"]["tasks_per_band"])
        band, part = divmod(rank, per_band)
        lo, hi = key_range(part, per_band)
        streams = [Records(layout.band(band, r)).restrict("h", lo, hi) for r in range(layout.tasks)]
        edges, members, documents, buckets, in_buckets, largest = [], [], 0, 0, 0, 0
        for batch in merged(streams, "h", ("h", "gid"), rows=self.merge_rows):
            h = batch["h"]
            same = h[1:] == h[:-1]
            pair = np.empty(int(same.sum()), lay.EDGE_DTYPE)
            pair["a"], pair["b"] = batch["gid"][:-1][same], batch["gid"][1:][same]
            edges.append(pair)
            documents += len(batch)
            if same.any():
                member = np.zeros(len(batch), bool)
                member[:-1] |= same
                member[1:] |= same
                found = np.empty(int(member.sum()), lay.NODE_DTYPE)
                found["gid"], found["row"] = batch["gid"][member], batch["row"][member]
                members.append(found)
                starts = np.flatnonzero(np.concatenate([[True], ~same]))
                sizes = np.diff(np.concatenate([starts, [len(batch)]]))
                buckets += int((sizes > 1).sum())
                in_buckets += int(sizes[sizes > 1].sum())
                largest = max(largest, int(sizes.max()))
        all_edges = np.concatenate(edges) if edges else np.empty(0, lay.EDGE_DTYPE)
        nodes = np.concatenate(members) if members else np.empty(0, lay.NODE_DTYPE)
        nodes = nodes[np.unique(nodes["gid"], return_index=True)[1]]
        lay.save_array(layout.nodes(rank), nodes)
        lay.save_array(layout.edges(rank), all_edges)
        return {
            "band": band,
            "documents": documents,
            "buckets_with_2_plus": buckets,
            "documents_in_them": in_buckets,
            "largest_bucket": largest,
            "edges": int(len(all_edges)),
        }


# ----------------------------------------------------------------- stage: MinHash clusters ---


def _find_roots(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root (in place); returns `parent`."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent[:] = grand


def _roots_of(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The roots of `nodes`, which then point straight at them (path compression)."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            parent[nodes] = roots
            return roots
        roots = up


def union_edges(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Joins the components of each edge (a[i], b[i]) (dense node indices): roots always hook
    onto smaller roots, so a component's root is its smallest index. Vectorised, repeated until
    no edge joins two roots; touches only the edges' nodes (and their paths)."""
    while len(a):
        ra, rb = _roots_of(parent, a), _roots_of(parent, b)
        differ = ra != rb
        if not differ.any():
            return
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


class MinhashClusters(Stage):
    """One task: connected components of the bucket graph, dealt to the `resolve` tasks
    (component root modulo tasks). The nodes (documents that share a band with another one) are
    merged from the bucket tasks' sorted lists; the edges are read one bucket task's file at a
    time into a union-find over them. Memory: ~16 bytes per node plus one edge file, not the
    corpus."""

    name = "🎯 MinHash clusters"
    stage = "clusters"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout = self.layout
        tasks = int(self.plan["minhash"]["bucket_tasks"])
        streams = [Records(layout.nodes(t)) for t in range(tasks)]
        unique = [
            batch[np.unique(batch["gid"], return_index=True)[1]]
            for batch in merged(streams, "gid", ("gid",), rows=self.merge_rows)
        ]
        found = np.concatenate(unique) if unique else np.empty(0, lay.NODE_DTYPE)
        del streams, unique
        nodes = np.ascontiguousarray(found["gid"])
        parent = np.arange(len(nodes), dtype=np.int64)
        edges = 0
        for t in range(tasks):
            pairs = lay.load_array(layout.edges(t))
            edges += len(pairs)
            ia = np.searchsorted(nodes, pairs["a"])
            ib = np.searchsorted(nodes, pairs["b"])
            del pairs
            union_edges(parent, ia, ib)
        roots = _find_roots(parent)
        components = int((roots == np.arange(len(nodes))).sum())
        largest = int(np.bincount(roots).max()) if len(nodes) else 0
        part_of = roots % layout.tasks
        for p in range(layout.tasks):
            lay.save_array(layout.cluster(p), found[part_of == p])
        return {
            "documents": int(len(nodes)),
            "edges": edges,
            "components": components,
            "largest": largest,
        }


# ------------------------------------------------------------------ stage: MinHash resolve ---


class MinhashResolve(Stage):
    """Task p runs local `clean`'s `NearDuplicateIndex` over the documents of its components in
    gid order (each signature read, by its row, from the rank that holds it): the near
    duplicates it refuses are removed. Memory: its components' signatures (~0.5 kB each) and
    the index (~1 kB per kept one)."""

    name = "🎯 MinHash resolve"
    stage = "resolve"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout, plan = self.layout, self.plan
        config = CleanConfig(**plan["clean"])
        num_perm = config.minhash_num_perm
        index = NearDuplicateIndex(config.minhash_threshold, num_perm)
        if (index.bands, index.rows) != (plan["minhash"]["bands"], plan["minhash"]["rows"]):
            raise InputError(
                f"band layout {index.bands}x{index.rows} differs from the plan's "
                f"{plan['minhash']['bands']}x{plan['minhash']['rows']} (another datasketch?)"
            )
        nodes = lay.load_array(layout.cluster(rank))
        gids = nodes["gid"]
        # Every signature this task needs, read row by row from the rank that holds it.
        signatures = np.empty((len(nodes), num_perm), np.uint32)
        ranks = layout.rank_of(gids)
        for r in np.unique(ranks):
            mine = np.flatnonzero(ranks == r)
            signatures[mine] = _read_rows(layout.sigs(int(r)), nodes["row"][mine], num_perm)
        removed = [gid for gid, sig in zip(gids, signatures, strict=True) if not index.add(sig)]
        removed_gids = np.asarray(removed, np.uint64)
        _save_removed(layout, "near", rank, removed_gids)
        return {"documents": int(len(gids)), "kept": len(index), "removed": int(len(removed_gids))}


# --------------------------------------------------------------------------- stage: filter ---


class KeptDocuments(Stage):
    """Rank r's documents minus every removal aimed at it: work/kept/r.npy (gid, chars, and
    where each one's line is in work/texts/r)."""

    name = "🔻 dedup filter"
    stage = "filter"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout = self.layout
        docs = lay.load_array(layout.docs(rank))
        exact = _load_removed(layout, "exact", rank)
        near = _load_removed(layout, "near", rank)
        is_exact = np.isin(docs["gid"], exact)
        is_near = np.isin(docs["gid"], near) & ~is_exact
        if int(is_exact.sum()) != len(np.unique(exact)):
            raise InputError(f"rank {rank}: exact removals name documents it does not hold")
        keep = ~(is_exact | is_near)
        kept = np.empty(int(keep.sum()), lay.KEPT_DTYPE)
        for field in lay.KEPT_DTYPE.names:
            kept[field] = docs[field][keep]
        lay.save_array(layout.kept(rank), kept)
        return {
            "documents": int(len(docs)),
            "exact_dedup_dropped": int(is_exact.sum()),
            "minhash_dropped": int(is_near.sum()),
            "kept": int(len(kept)),
            "bytes_kept": int(docs["nbytes"][keep].sum()),
        }
