"""Morpheme-aware byte-level BPE (the Polyglot-Ko "MBBPE" scheme): training and loading.

Training marks MeCab-ko morpheme boundaries with U+0CF1 (`MORPHEME_BOUNDARY`) in the training
text; the training pre-tokenizer is `Split(U+0CF1, removed)` then GPT-2 `ByteLevel`, so no BPE
merge ever crosses a morpheme boundary. The marker is *inserted* between two morphemes that touch
(MeCab spans, end of one == start of the next); no character of the text is replaced, so removing
the markers gives the text back exactly (whitespace and newlines included).

The saved tokenizer needs no MeCab: its pre-tokenizer is `ByteLevel` alone (the released 2022 file
keeps the `Split(U+0CF1, removed)` step, which only matters for pre-marked text and would drop a
literal U+0CF1; without it `decode(encode(t)) == t` holds for every string). Specials are single
ids laid out like the released tokenizer: `<pad>` 0, `<eos>` 1 (a legacy id kept only so the
layout matches), `<|endoftext|>` 2 (the eos), `<|sep|>` 3, BPE tokens, then `<|acc|>`, `<|tel|>`,
`<|rrn|>` as the last three ids, so `vocab_size=30003` gives 30000, 30001, 30002.

Any Hugging Face tokenizer directory (or a bare `tokenizer.json`) loads with `load_tokenizer`; the
eos is `<|endoftext|>` when the vocab has it, else the directory's configured eos token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.output_dir import check_output, staged

MORPHEME_BOUNDARY = "\u0cf1"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
SEP_TOKEN = "<|sep|>"
# Ids 0..3, in this order, exactly as in the released tokenizer.
LEADING_SPECIAL_TOKENS = (PAD_TOKEN, "<eos>", EOS_TOKEN, SEP_TOKEN)
# The last three ids (PII masks written by the cleaner).
TRAILING_SPECIAL_TOKENS = ("<|acc|>", "<|tel|>", "<|rrn|>")
SPECIAL_TOKENS = LEADING_SPECIAL_TOKENS + TRAILING_SPECIAL_TOKENS
MODEL_MAX_LENGTH = 2048
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # every byte must be a token
_MARK_CHUNK = 256  # documents per task sent to a marking worker


class MorphemeMarker:
    """Inserts `MORPHEME_BOUNDARY` between touching MeCab-ko morphemes (one MeCab per instance).

    Morphemes are located by their surface strings, searched forward through the text: MeCab's
    own spans are shifted by any leading whitespace (python-mecab-ko 1.3.7). Should a surface ever
    not be found after only whitespace, marking stops for the rest of that text (the text itself
    is never changed, only markers are added)."""

    def __init__(self) -> None:
        from mecab import MeCab  # only training needs MeCab

        self._mecab = MeCab()
        try:  # python-mecab-ko's lattice gives bare nodes, 4x faster than building Morphemes
            from mecab.utils import create_lattice

            self._tagger, self._create_lattice = self._mecab._tagger, create_lattice
        except (ImportError, AttributeError):
            self._tagger = None

    def surfaces(self, text: str) -> list[str]:
        """The morphemes of `text`, in order."""
        if self._tagger is None:
            return self.parsed_surfaces(text)
        lattice = self._create_lattice(text)
        if not self._tagger.parse(lattice):
            raise RuntimeError(f"MeCab failed: {self._tagger.what()}")
        return [node.surface for _, node in lattice]

    def parsed_surfaces(self, text: str) -> list[str]:
        """`surfaces` through MeCab's public (slower) `parse`."""
        return [m.surface for m in self._mecab.parse(text)]

    def __call__(self, text: str) -> str:
        pieces = []
        pos = 0
        prev_end = -1
        for surface in self.surfaces(text):
            start = text.find(surface, pos)
            gap = text[pos:start]
            if start < 0 or (gap and not gap.isspace()):
                break
            pieces.append(gap)
            if start == prev_end:
                pieces.append(MORPHEME_BOUNDARY)
            pieces.append(surface)
            pos = prev_end = start + len(surface)
        pieces.append(text[pos:])
        return "".join(pieces)


_SPECIAL_PATTERN = re.compile("|".join(map(re.escape, sorted(SPECIAL_TOKENS, key=len)[::-1])))


def training_text(marker: MorphemeMarker, text: str) -> str:
    """`text` as the BPE trainer sees it: special tokens (single ids already) become boundaries,
    so no merges are spent on their pieces; morpheme boundaries are marked."""
    return marker(_SPECIAL_PATTERN.sub(MORPHEME_BOUNDARY, text))


_WORKER_MARKER: MorphemeMarker | None = None


def _init_mark_worker() -> None:
    global _WORKER_MARKER
    _WORKER_MARKER = MorphemeMarker()


def _mark_chunk(texts: list[str]) -> list[str]:
    assert _WORKER_MARKER is not None
    return [training_text(_WORKER_MARKER, t) for t in texts]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def iter_training_texts(texts: Iterable[str], *, num_workers: int = 1) -> Iterator[str]:
    """`training_text` of each of `texts`, in order; `num_workers > 1` runs MeCab in processes."""
    if num_workers <= 1:
        marker = MorphemeMarker()
        for text in texts:
            yield training_text(marker, text)
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX/threads are running
    with ctx.Pool(num_workers, initializer=_init_mark_worker) as pool:
        for marked in pool.imap(_mark_chunk, _chunks(texts, _MARK_CHUNK), chunksize=1):
            yield from marked


def training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on (and drop) the morpheme marker, then GPT-2 byte-level splitting."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(MORPHEME_BOUNDARY, "removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _inference_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@dataclasses.dataclass(frozen=True)
class LoadedTokenizer:
    """A tokenizer ready to encode: the `tokenizers.Tokenizer`, its eos id and identity.

    `sha256` is the hash of `tokenizer.json` (what shard manifests record); `vocab_size` counts
    added tokens too (ids are < vocab_size)."""

    tokenizer: Tokenizer
    path: Path
    eos_id: int
    eos_token: str
    pad_id: int | None
    vocab_size: int
    sha256: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no eos appended)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included (so decode(encode(t)) == t)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def tokenizer_json_path(path: str | os.PathLike) -> Path:
    """`path/tokenizer.json` for a directory, `path` itself for a file; InputError if missing."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
    return file


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of the tokenizer's `tokenizer.json`."""
    return hashlib.sha256(tokenizer_json_path(path).read_bytes()).hexdigest()


def _configured_token(directory: Path, key: str) -> str | None:
    """A special token named in tokenizer_config.json or special_tokens_map.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8")).get(key)
        except (ValueError, AttributeError) as e:
            raise InputError(f"{file}: not a JSON object ({e})") from e
        if isinstance(value, dict):  # {"content": "<eos>", ...} in older files
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None) -> LoadedTokenizer:
    """Loads a tokenizer directory (or a `tokenizer.json` file) without MeCab or transformers.

    The eos is `eos_token` when given, else `<|endoftext|>` when the vocab has it (the Polyglot-Ko
    models' eos, id 2, also in the released 2022 tokenizer whose config names `<eos>`), else the
    eos token of the directory's config. InputError if none resolves to an id."""
    file = tokenizer_json_path(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise InputError(f"{file}: not a loadable tokenizer.json ({e})") from e
    directory = file.parent
    if eos_token is None:
        if tokenizer.token_to_id(EOS_TOKEN) is not None:
            eos_token = EOS_TOKEN
        else:
            eos_token = _configured_token(directory, "eos_token")
    eos_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise InputError(
            f"{file}: no eos token ({EOS_TOKEN} is not in the vocab and the config names "
            f"{eos_token!r}); pass one explicitly"
        )
    pad_token = _configured_token(directory, "pad_token")
    pad_id = None if pad_token is None else tokenizer.token_to_id(pad_token)
    return LoadedTokenizer(
        tokenizer=tokenizer,
        path=directory if Path(path).is_dir() else file,
        eos_id=eos_id,
        eos_token=eos_token,
        pad_id=pad_id,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
    )


def _new_bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = training_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _save_hf_directory(tokenizer: Tokenizer, directory: Path) -> None:
    """Writes tokenizer.json + tokenizer_config.json the way `AutoTokenizer` reads them."""
    from transformers import PreTrainedTokenizerFast  # only for writing the HF config files

    extra = [t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=False,  # True would turn " ." into "." on decode
        model_max_length=MODEL_MAX_LENGTH,
    )
    hf.save_pretrained(str(directory))


def train_tokenizer(
    texts: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 30003,
    min_frequency: int = 2,
    num_workers: int = 1,
    overwrite: bool = False,
    show_progress: bool = True,
    inputs: Sequence[str | os.PathLike] = (),
) -> LoadedTokenizer:
    """Trains the morpheme-aware byte-level BPE on `texts` and saves it to `output_dir`.

    `vocab_size` counts every id (7 specials + 256 bytes + merges). If the corpus runs out of pairs
    with at least `min_frequency` occurrences first, the vocab is smaller (a warning says so) and
    the trailing specials sit right after the last merge. The directory appears complete or not at
    all; an existing one is replaced only with `overwrite`, and never when it is, contains or lies
    inside one of `inputs` (the paths `texts` come from). Returns the loaded result."""
    if vocab_size < _MIN_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size} is below the minimum {_MIN_VOCAB}")
    output_dir = Path(output_dir)
    check_output(output_dir, inputs, overwrite=overwrite)

    tokenizer = _new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TRAILING_SPECIAL_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(LEADING_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress and sys.stderr.isatty(),  # its bars would flood a log file
    )
    documents = 0

    def counted(stream: Iterable[str]) -> Iterator[str]:
        nonlocal documents
        for text in tqdm(
            stream, desc="mark morphemes", unit="doc", disable=None if show_progress else True
        ):
            documents += 1
            yield text

    tokenizer.train_from_iterator(
        counted(iter_training_texts(texts, num_workers=num_workers)), trainer
    )
    if documents == 0:
        where = f" in {', '.join(map(str, inputs))}" if inputs else ""
        raise InputError(f"no documents to train the tokenizer on{where}")
    tokenizer.add_special_tokens(list(TRAILING_SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = _inference_pre_tokenizer()
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        logging.warning(
            "the corpus (%d documents) yields only %d ids, not vocab_size=%d; "
            "<|acc|> <|tel|> <|rrn|> are ids %d..%d",
            documents,
            got,
            vocab_size,
            got - 3,
            got - 1,
        )

    with staged(output_dir) as staging:
        _save_hf_directory(tokenizer, staging)
    return load_tokenizer(output_dir)
