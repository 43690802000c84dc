"""Exact and near-duplicate detection: 16-byte keys of normalised text and MinHash-LSH.

Split for multiprocessing: the per-document work (`exact_key`, `MinHasher.signatures`) is pure and
runs in the workers; the indexes (`ExactIndex`, `NearDuplicateIndex`) live in one process, the one
that sees every document in input order, so the first occurrence is the one kept.

Shingles are character 5-grams of the text with all whitespace removed, not the authors' 13-word
shingles: Korean spacing is unreliable (user text often skips or misplaces spaces, which changes
every word shingle but no character shingle), words are long agglutinated units (a particle
attached changes the word), and most short documents have no 13-word window at all. Five
syllables are about two Korean words.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WHITESPACE = re.compile(r"\s+")
_SCHEME = "affine32"  # datasketch >= 2: bijective 32-bit permutations, uint32 signatures
# LSH bands favour recall (false negatives weigh 0.9): every candidate is then checked against its
# estimated Jaccard similarity, which removes the extra false positives. At threshold 0.8 and
# 128 permutations this gives 14 bands of 9 rows: P(candidate | J=0.8) = 0.87 (0.40 with the
# default equal weights), P(candidate | J=0.6) = 0.13.
_LSH_WEIGHTS = (0.1, 0.9)
_SHINGLE_PRIME = np.uint32(0x01000193)  # the 32-bit FNV prime (odd)


def normalize_for_dedup(text: str) -> str:
    """NFKC, case-folded, whitespace runs as one space, stripped: the text exact dedup compares."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str) -> bytes:
    """16-byte blake2b digest of `normalize_for_dedup(text)`."""
    return hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).digest()


def _compact(text: str) -> str:
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text).casefold())


def char_shingles(text: str, n: int) -> set[str]:
    """Character n-grams of the NFKC, case-folded text with all whitespace removed; a text of at
    most n characters (but not empty) is its own single shingle."""
    compact = _compact(text)
    if len(compact) <= n:
        return {compact} if compact else set()
    return {compact[i : i + n] for i in range(len(compact) - n + 1)}


def shingle_hash(shingle: str) -> int:
    """32-bit polynomial hash of a shingle's code points: sum c_k * P^(len-1-k) mod 2^32.

    An odd multiplier makes two shingles that differ in one character never collide; datasketch's
    affine32 scheme then avalanches the value (MurmurHash3 finalizer) before permuting it.
    """
    h = 0
    for ch in shingle:
        h = (h * int(_SHINGLE_PRIME) + ord(ch)) & 0xFFFFFFFF
    return h


class ExactIndex:
    """The set of exact-dedup keys seen so far (16 bytes each plus set overhead)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def add(self, key: bytes) -> bool:
        """True if `key` is new (and is now recorded), False for a duplicate."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on uint32 values (as datasketch's affine32 scheme does)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures (`uint32[num_perm]`) of character-shingle sets, bit for bit those of
    `datasketch.MinHash(num_perm, seed, hashfunc=int, scheme="affine32")` fed the `shingle_hash`
    of every shingle, but computed for a whole batch of documents in a few numpy operations
    (datasketch's per-document `update_batch` costs ~45 us per short document, mostly overhead).
    """

    _CHUNK_ROWS = 1 << 14  # shingles per permutation block: 16k x 128 x 4 B = 8 MiB

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        *,
        permutations: np.ndarray | None = None,
    ) -> None:
        if num_perm < 2 or ngram < 1:
            raise ValueError(f"need num_perm >= 2 and ngram >= 1, got {num_perm}, {ngram}")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        if permutations is None:
            # Imported here: datasketch pulls in scipy (~1 s), which worker processes that are
            # handed `permutations` never need.
            from datasketch import MinHash

            permutations = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        if permutations.shape != (2, num_perm):
            raise ValueError(f"permutations shape {permutations.shape} != (2, {num_perm})")
        self.permutations = permutations.astype(np.uint32)
        self._a, self._b = self.permutations

    def signature(self, text: str) -> np.ndarray:
        """`uint32[num_perm]` MinHash of `text`'s shingles; all 0xFFFFFFFF if it has none."""
        return self.signatures([text])[0]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """`uint32[len(texts), num_perm]`: the MinHash of each text's `char_shingles`."""
        n = self.ngram
        out = np.full((len(texts), self.num_perm), 0xFFFFFFFF, np.uint32)
        compacts = [_compact(t) for t in texts]
        lengths = np.fromiter(map(len, compacts), np.int64, len(compacts))
        hashes, docs = [], []
        # Texts shorter than n have one shingle, the whole text.
        for i in np.flatnonzero((lengths > 0) & (lengths < n)):
            hashes.append(np.array([shingle_hash(compacts[i])], np.uint32))
            docs.append(np.array([i]))
        points = np.frombuffer("".join(compacts).encode("utf-32-le"), np.uint32)
        if len(points) >= n:
            count = len(points) - n + 1
            rolling = np.zeros(count, np.uint32)
            for k in range(n):  # the polynomial of `shingle_hash`, for every window at once
                rolling = rolling * _SHINGLE_PRIME + points[k : k + count]
            doc_of = np.repeat(np.arange(len(texts)), lengths)[:count]
            ends = np.cumsum(lengths)
            inside = np.arange(count) + n <= ends[doc_of]  # window within one text
            hashes.append(rolling[inside])
            docs.append(doc_of[inside])
        if not hashes:
            return out
        order = np.argsort(np.concatenate(docs), kind="stable")
        all_hashes = _fmix32(np.concatenate(hashes)[order])
        all_docs = np.concatenate(docs)[order]
        for lo in range(0, len(all_hashes), self._CHUNK_ROWS):
            h = all_hashes[lo : lo + self._CHUNK_ROWS]
            d = all_docs[lo : lo + self._CHUNK_ROWS]
            permuted = h[:, None] * self._a + self._b  # wraps mod 2^32: datasketch's affine32
            starts = np.concatenate([[0], np.flatnonzero(np.diff(d)) + 1])
            firsts = d[starts]
            out[firsts] = np.minimum(out[firsts], np.minimum.reduceat(permuted, starts, axis=0))
        return out


class NearDuplicateIndex:
    """Streaming near-duplicate filter over MinHash signatures: LSH banding with the band layout
    datasketch's `MinHashLSH` chooses, each candidate then verified by its estimated Jaccard
    similarity, so that the first of a group of near duplicates is the one kept.

    The band tables are plain dicts (band hash -> document number), not `MinHashLSH`'s storage:
    that keeps a set per bucket and a key list per document, about 5.7 kB per document at 14 bands
    (measured on NSMC) against about 1 kB here. Kept signatures are stored as their low 8 bits
    (b-bit MinHash, 128 bytes at 128 permutations) for the verification.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, *, block_rows: int = 1 << 16):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm = threshold, num_perm
        from datasketch import MinHashLSH  # scipy: see MinHasher

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
        self.bands, self.rows = lsh.b, lsh.r
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._block_rows = block_rows
        self._blocks: list[np.ndarray] = []
        self._count = 0

    def _low_bits(self, key: int) -> np.ndarray:
        return self._blocks[key // self._block_rows][key % self._block_rows]

    def _store(self, low_bits: np.ndarray) -> int:
        key, row = self._count, self._count % self._block_rows
        if row == 0:
            self._blocks.append(np.empty((self._block_rows, self.num_perm), np.uint8))
        self._blocks[-1][row] = low_bits
        self._count += 1
        return key

    def _similar(self, key: int, low_bits: np.ndarray) -> bool:
        # b-bit estimator: unrelated values agree on 8 low bits with probability 1/256.
        agree = np.count_nonzero(self._low_bits(key) == low_bits) / self.num_perm
        return (agree - 1 / 256) / (1 - 1 / 256) >= self.threshold

    def add(self, signature: np.ndarray) -> bool:
        """True if no kept document is a near duplicate (estimated Jaccard >= threshold) of the one
        with this `uint32[num_perm]` signature; it is then kept and indexed. False otherwise."""
        if signature.shape != (self.num_perm,):
            raise ValueError(f"signature shape {signature.shape} != ({self.num_perm},)")
        raw = signature.astype(np.uint32, copy=False).tobytes()
        step = 4 * self.rows
        band_keys = [hash(raw[i * step : (i + 1) * step]) for i in range(self.bands)]
        low_bits = signature.astype(np.uint8)
        checked: set[int] = set()
        for table, band_key in zip(self._tables, band_keys, strict=True):
            hit = table.get(band_key)
            if hit is None:
                continue
            for key in hit if isinstance(hit, list) else (hit,):
                if key not in checked:
                    checked.add(key)
                    if self._similar(key, low_bits):
                        return False
        key = self._store(low_bits)
        for table, band_key in zip(self._tables, band_keys, strict=True):
            hit = table.get(band_key)
            if hit is None:
                table[band_key] = key
            elif isinstance(hit, list):
                hit.append(key)
            else:
                table[band_key] = [hit, key]
        return True

    def __len__(self) -> int:
        return self._count
