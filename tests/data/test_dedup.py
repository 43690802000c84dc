"""Dedup pieces against independent references: datasketch's own MinHash, brute-force Jaccard."""

import unicodedata

import numpy as np
import pytest
from datasketch import MinHash

from polyglot_jax.data.dedup import (
    ExactIndex,
    MinHasher,
    NearDuplicateIndex,
    char_shingles,
    exact_key,
    normalize_for_dedup,
    shingle_hash,
)


def _korean(rng: np.random.Generator, chars: int) -> str:
    """Random Hangul syllables in words of 1-6 characters."""
    out, left = [], chars
    while left > 0:
        n = min(left, int(rng.integers(1, 7)))
        out.append("".join(chr(c) for c in rng.integers(0xAC00, 0xD7A4, n)))
        left -= n
    return " ".join(out)


def test_exact_key_normalises_case_width_spacing_and_composition():
    base = "정말 재밌는 영화 ABC 123"
    variants = [
        "  정말   재밌는\n영화\tabc 123 ",
        unicodedata.normalize("NFD", base),  # decomposed jamo, as some systems write Hangul
        "정말 재밌는 영화 ＡＢＣ １２３",  # full-width Latin and digits
    ]
    assert all(exact_key(v) == exact_key(base) for v in variants)
    assert exact_key("정말 재밌는 영화") != exact_key("정말 재밌는 영화!")
    assert exact_key("정말재밌는 영화") != exact_key("정말 재밌는 영화")  # spacing is MinHash's job
    assert len(exact_key(base)) == 16
    assert normalize_for_dedup(" A\u3000b\n") == "a b"


def test_exact_index():
    index = ExactIndex()
    assert [index.add(k) for k in [b"a", b"b", b"a", b"c", b"b"]] == [1, 1, 0, 1, 0]
    assert len(index) == 3


def test_char_shingles_by_hand():
    assert char_shingles("가나 다라\n마바", 5) == {"가나다라마", "나다라마바"}
    assert char_shingles("AB c", 5) == {"abc"}
    assert char_shingles(" \n", 5) == set()
    assert char_shingles("가나다 가나다", 3) == {"가나다", "나다가", "다가나"}


def test_shingle_hash_is_the_stated_polynomial():
    assert shingle_hash("") == 0
    assert shingle_hash("a") == 97
    assert shingle_hash("ab") == (97 * 0x01000193 + 98) % 2**32
    assert (
        shingle_hash("가나다라마")
        == sum(ord(c) * pow(0x01000193, 4 - i, 2**32) for i, c in enumerate("가나다라마")) % 2**32
    )


def test_signatures_equal_datasketch_minhash():
    """The batched signatures are bit for bit datasketch's MinHash of the same shingle hashes."""
    rng = np.random.default_rng(0)
    texts = ["", " ", "가", "가나다라", "가나다라마", "Hello, World!", _korean(rng, 30)]
    texts += [_korean(rng, int(n)) for n in rng.integers(5, 300, 20)]
    texts.append(_korean(rng, 20_000))  # more shingles than one permutation block
    texts.append("가나다라마" * 50)  # repeated shingles
    for num_perm, ngram, seed in [(128, 5, 1), (64, 3, 7)]:
        hasher = MinHasher(num_perm, ngram, seed)
        batch = hasher.signatures(texts)
        assert batch.shape == (len(texts), num_perm) and batch.dtype == np.uint32
        for text, sig in zip(texts, batch, strict=True):
            ref = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme="affine32")
            ref.update_batch([shingle_hash(s) for s in char_shingles(text, ngram)])
            np.testing.assert_array_equal(sig, ref.hashvalues)
        np.testing.assert_array_equal(hasher.signature(texts[7]), batch[7])


def test_signature_agreement_estimates_jaccard():
    rng = np.random.default_rng(1)
    hasher = MinHasher(256)
    errors = []
    for _ in range(30):
        base = _korean(rng, 200)
        cut = int(rng.integers(0, 150))
        other = base[:cut] + _korean(rng, int(rng.integers(1, 120))) + base[cut + 40 :]
        a, b = char_shingles(base, 5), char_shingles(other, 5)
        true = len(a & b) / len(a | b)
        sa, sb = hasher.signatures([base, other])
        errors.append(np.mean(sa == sb) - true)
    # 256 permutations: standard error <= 0.031 per pair.
    assert np.max(np.abs(errors)) < 0.12 and abs(np.mean(errors)) < 0.03


def _edit(rng, text: str, n: int) -> str:
    chars = list(text)
    for i in rng.choice(len(chars), n, replace=False):
        chars[i] = chr(int(rng.integers(0xAC00, 0xD7A4)))
    return "".join(chars)


def test_near_duplicate_index_on_constructed_duplicates():
    rng = np.random.default_rng(2)
    hasher = MinHasher()
    originals = [_korean(rng, 600) for _ in range(60)]
    near = [_edit(rng, t, 3) for t in originals[:30]]  # ~3% of shingles differ per edit: J ~ 0.9
    respaced = [t.replace(" ", "") for t in originals[30:40]]  # spacing only: J = 1
    halves = [t[:300] + _korean(rng, 300) for t in originals[40:50]]  # J ~ 1/3: not duplicates
    for a, b in zip(originals[:30], near, strict=True):
        sa, sb = char_shingles(a, 5), char_shingles(b, 5)
        assert len(sa & sb) / len(sa | sb) > 0.85
    docs = originals + near + respaced + halves
    index = NearDuplicateIndex(0.8)
    kept = [index.add(s) for s in hasher.signatures(docs)]
    assert kept == [True] * 60 + [False] * 40 + [True] * 10
    assert len(index) == 70
    assert (index.bands, index.rows) == (14, 9)


def test_near_duplicate_index_rejects_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(0.0)
    with pytest.raises(ValueError, match="shape"):
        NearDuplicateIndex(0.8, 128).add(np.zeros(64, np.uint32))


def test_a_near_duplicate_exactly_at_the_threshold_is_dropped():
    """ "Estimated Jaccard >= threshold": two signatures equal but for the low bits of 8 of 128
    values (every LSH band but the last identical, so they are compared) estimate
    (120/128 - 1/256) / (1 - 1/256), the b-bit estimate; at exactly that threshold the second is
    a duplicate, just above it it is kept."""
    a = np.arange(128, dtype=np.uint32)
    b = a.copy()
    b[-8:] += 1
    estimate = (120 / 128 - 1 / 256) / (1 - 1 / 256)
    at = NearDuplicateIndex(estimate, 128)
    assert at.add(a) and not at.add(b)
    above = NearDuplicateIndex(float(np.nextafter(estimate, 1.0)), 128)
    assert above.add(a) and above.add(b)
