"""seqio Vocabulary, Tasks and Mixtures over polyglot_jax data, for t5x and seqio users.

This is the only module of the package that imports seqio (and with it TensorFlow); nothing else
imports it, so training and the grain pipeline never load TensorFlow. Install the `seqio` extra.

- `PolyglotVocabulary`: a `seqio.Vocabulary` over a Hugging Face tokenizer directory (byte-level
  BPE): encode/decode in python and, through `tf.numpy_function`, in TensorFlow.
- `register_corpus_task`: a Task over a tokenized directory (`polyglot-jax tokenize` output), one
  example per document: `{"targets": int32 [len]}`, the document's ids *without* its eos; the
  `targets` feature has `add_eos=True`, so seqio appends the eos back (after trimming, when a
  sequence length is given).
- `register_kobest_tasks`: one Task per KoBEST task with `inputs` = the lm-evaluation-harness prompt
  and `targets` = the gold choice's continuation (leading space, e.g. " 예"), both tokenized
  without eos so that a target's summed log-likelihood is exactly the harness's score; plus a
  Mixture `kobest` over them at equal rates.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data.records import decode_record, manifest_tokenizer, read_manifest, shard_files
from polyglot_jax.data.tokenizer import PAD_TOKEN, LoadedTokenizer, load_tokenizer
from polyglot_jax.errors import ConfigError, InputError

_RECORDS_PER_READ = 64  # ArrayRecord records fetched per read call (each up to block_tokens ids)


class PolyglotVocabulary(seqio.Vocabulary):
    """A seqio vocabulary over a tokenizer directory (or `tokenizer.json`) that `load_tokenizer`
    reads. Ids are the tokenizer's own: eos from `load_tokenizer` (`<|endoftext|>`, id 2 in the
    released layout), pad 0 (seqio pads with 0, so the tokenizer's pad must be id 0), no unk (byte-
    level BPE encodes every string), `_base_vocab_size` = the tokenizer's size with added tokens.

    Decoding drops pad and eos ids (and stops at the first eos, as every seqio vocabulary does);
    every other special token decodes to its text. So decode(encode(t)) == t for every string t
    that does not contain the literal pad or eos token text. The tokenizer is loaded on first use
    (the object pickles as its path)."""

    def __init__(self, tokenizer_path: str | os.PathLike, *, eos_token: str | None = None):
        self._path = str(tokenizer_path)
        self._eos_token = eos_token
        self._loaded: LoadedTokenizer | None = None
        super().__init__(extra_ids=0)
        self._check_pad()

    @property
    def loaded(self) -> LoadedTokenizer:
        """The underlying `LoadedTokenizer`."""
        if self._loaded is None:
            self._loaded = load_tokenizer(self._path, eos_token=self._eos_token)
        return self._loaded

    def _check_pad(self) -> None:
        pad = self.loaded.pad_id
        if pad is None:
            pad = self.loaded.tokenizer.token_to_id(PAD_TOKEN)
        if pad != 0:
            raise ConfigError(
                f"{self._path}: seqio pads with id 0, but this tokenizer's pad id is {pad} "
                f"(expected {PAD_TOKEN} at id 0)"
            )

    def __getstate__(self) -> dict:
        return {"_path": self._path, "_eos_token": self._eos_token, "_extra_ids": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._loaded = None

    @property
    def eos_id(self) -> int:
        return self.loaded.eos_id

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.loaded.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.loaded.encode(s)

    def _decode(self, ids: Sequence[int]) -> str:
        drop = (self.pad_id, self.eos_id)
        size = self.loaded.vocab_size
        return self.loaded.decode(int(i) for i in ids if i not in drop and 0 <= i < size)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """tf.string scalar -> int32 [len]."""

        def encode(text: np.ndarray | bytes) -> np.ndarray:
            text = np.asarray(text).item()  # a 0-d object array in eager mode, bytes in graphs
            return np.asarray(self._encode(text.decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int [..., len] -> tf.string [...] (one string per row)."""

        def decode(batch: np.ndarray) -> np.ndarray:
            rows = batch.reshape(-1, batch.shape[-1]) if batch.ndim else batch.reshape(1, 1)
            texts = [self._decode(row.tolist()).encode("utf-8") for row in rows]
            return np.array(texts, dtype=object).reshape(batch.shape[:-1])

        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolyglotVocabulary):
            return False
        return (self.loaded.sha256, self.eos_id) == (other.loaded.sha256, other.eos_id)

    def __hash__(self) -> int:
        return hash((self.loaded.sha256, self.eos_id))

    def __str__(self) -> str:
        return f"PolyglotVocabulary(path={self._path}, eos_id={self.eos_id})"


# ------------------------------------------------------------------------- tokenized corpora ---


def iter_shard_documents(path: str, eos_id: int) -> Iterator[np.ndarray]:
    """Each document of one shard file, in order: int32 [len] ids without the trailing eos.

    A record holds whole documents plus, at its start, possibly the continuation of a document
    cut at the previous record's end (a record's `starts` lists only where documents begin), so a
    document is complete when the next one starts or the shard ends."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    pending: list[np.ndarray] = []  # pieces of the document being assembled

    def finish() -> np.ndarray:
        doc = np.concatenate(pending).astype(np.int32)
        pending.clear()
        if doc.size == 0 or doc[-1] != eos_id:
            raise InputError(f"{path}: a document does not end with eos id {eos_id}")
        return doc[:-1]

    try:
        total = reader.num_records()
        for begin in range(0, total, _RECORDS_PER_READ):
            for data in reader.read(begin, min(begin + _RECORDS_PER_READ, total)):
                tokens, starts = decode_record(data)
                cuts = [int(s) for s in starts] + [tokens.size]
                if cuts[0] > 0:  # the record opens with a continuation
                    pending.append(tokens[: cuts[0]])
                for lo, hi in itertools.pairwise(cuts):
                    if pending:
                        yield finish()
                    pending.append(tokens[lo:hi])
        if pending:
            yield finish()
    finally:
        reader.close()


def corpus_dataset_fn(
    directories: Mapping[str, str | os.PathLike],
) -> Callable[..., tf.data.Dataset]:
    """A seqio `dataset_fn(split, shuffle_files, seed=None)` over tokenized directories (one per
    split): examples `{"targets": int32 [len]}`, one per document; `shuffle_files` shuffles the
    order of the shard files (with `seed`), documents within a shard keep their order."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        directory = directories[split]
        manifest = read_manifest(directory)
        files = shard_files(directory, manifest)
        eos_id = int(manifest["eos_id"])
        if shuffle_files:
            files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]

        def generate() -> Iterator[dict[str, np.ndarray]]:
            for file in files:
                for doc in iter_shard_documents(file, eos_id):
                    yield {"targets": doc}

        return tf.data.Dataset.from_generator(
            generate, output_signature={"targets": tf.TensorSpec([None], tf.int32)}
        )

    return dataset_fn


def register_corpus_task(
    name: str,
    tokenized_dir: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    vocabulary: PolyglotVocabulary | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> seqio.Task:
    """Registers (replacing any task of that name) and returns a Task over tokenized shards.

    `tokenized_dir` is one directory (split "train") or a mapping split -> directory. The
    vocabulary is `vocabulary`, else one over `tokenizer`, else over the tokenizer path that the
    manifest records; InputError if its hash differs from the manifest's `tokenizer_sha256`.
    Examples: `{"targets": int32 [len]}` without eos; the feature appends it (`add_eos=True`)."""
    if isinstance(tokenized_dir, Mapping):
        directories = {str(k): str(v) for k, v in tokenized_dir.items()}
    else:
        directories = {"train": str(tokenized_dir)}
    manifests = {split: read_manifest(d) for split, d in directories.items()}
    if vocabulary is None:
        if tokenizer is None:
            split, manifest = next(iter(manifests.items()))
            recorded = manifest.get("tokenizer")
            if not recorded:
                raise ConfigError(f"{name}: the manifest names no tokenizer; pass one")
            tokenizer = manifest_tokenizer(directories[split], recorded)
            if tokenizer is None:
                raise InputError(
                    f"{name}: the tokenizer {recorded} that {directories[split]}/manifest.json "
                    "names is not there; pass one"
                )
        vocabulary = PolyglotVocabulary(tokenizer)
    for split, manifest in manifests.items():
        want = manifest.get("tokenizer_sha256")
        if want is not None and want != vocabulary.loaded.sha256:
            raise InputError(
                f"{directories[split]}: tokenized with tokenizer sha256 {want[:12]}..., not "
                f"{vocabulary.loaded.sha256[:12]}... ({vocabulary.loaded.path})"
            )
        if int(manifest["eos_id"]) != vocabulary.eos_id:
            raise InputError(
                f"{directories[split]}: eos_id {manifest['eos_id']} differs from the "
                f"vocabulary's {vocabulary.eos_id}"
            )
    source = seqio.FunctionDataSource(
        corpus_dataset_fn(directories),
        splits=list(directories),
        num_input_examples={s: int(m["documents"]) for s, m in manifests.items()},
    )
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features={
            "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=1)
        },
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
    )


# ---------------------------------------------------------------------------------- KoBEST ---

KOBEST_TASKS = ("boolq", "copa", "wic", "hellaswag", "sentineg")
YES_NO = (" 아니오", " 예")  # label 0, 1
SENTINEG_CHOICES = (" 부정", " 긍정")
SENTINEG_HARNESS_PROMPT = "문장: {sentence} 긍부정:"
SENTINEG_AUTHORS_PROMPT = "다음 문장에서 느껴지는 감정을 답하시오.\n\n문장: {sentence}\n정답:"
_COPA_CONNECTIVE = {"원인": "왜냐하면", "결과": "그래서"}


def kobest_prompt_and_choices(
    task: str, doc: Mapping[str, Any], *, sentineg_prompt: str = SENTINEG_HARNESS_PROMPT
) -> tuple[str, list[str]]:
    """(context, choice continuations) of one KoBEST document, as the polyglot branch of
    lm-evaluation-harness renders them; the gold continuation is `choices[doc["label"]]`."""
    if task == "boolq":
        return f"{doc['paragraph']} 질문: {doc['question']} 답변: ", list(YES_NO)
    if task == "copa":
        # .strip(): six train lines of KoBEST v1 say "원인 " / "결과 " (trailing space).
        connective = _COPA_CONNECTIVE[doc["question"].strip()]
        choices = [" " + doc["alternative_1"], " " + doc["alternative_2"]]
        return f"{doc['premise']} {connective}", choices
    if task == "wic":
        prompt = (
            f"문장1: {doc['context_1']} 문장2: {doc['context_2']} "
            f"두 문장에서 {doc['word']}가 같은 뜻으로 쓰였나?"
        )
        return prompt, list(YES_NO)
    if task == "hellaswag":
        return f"문장: {doc['context']}", [" " + doc[f"ending_{i}"] for i in range(1, 5)]
    if task == "sentineg":
        return sentineg_prompt.format(sentence=doc["sentence"]), list(SENTINEG_CHOICES)
    raise ConfigError(f"unknown KoBEST task {task!r}; expected one of {', '.join(KOBEST_TASKS)}")


def kobest_splits(data_dir: str | os.PathLike, task: str) -> dict[str, Path]:
    """split name -> jsonl file of one task (every `*.jsonl` in `data_dir/task`)."""
    folder = Path(data_dir) / task
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    if not files:
        raise InputError(f"{folder}: no KoBEST jsonl files (expected train/validation/test.jsonl)")
    return files


def _read_jsonl(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except ValueError as e:
                raise InputError(f"{path}:{line_no}: not valid JSON ({e})") from e
    return docs


def kobest_examples(
    task: str, path: str | os.PathLike, *, sentineg_prompt: str = SENTINEG_HARNESS_PROMPT
) -> Iterator[dict[str, Any]]:
    """Rendered examples of one KoBEST jsonl file: `inputs` (prompt), `targets` (gold choice
    text), `choices` (all continuations), `label` (int), `idx` (line index)."""
    path = Path(path)
    for idx, doc in enumerate(_read_jsonl(path)):
        try:
            prompt, choices = kobest_prompt_and_choices(task, doc, sentineg_prompt=sentineg_prompt)
            label = int(doc["label"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: example {idx}: missing or bad field ({e})") from e
        if not 0 <= label < len(choices):
            raise InputError(f"{path}: example {idx}: label {label} not in 0..{len(choices) - 1}")
        yield {
            "inputs": prompt,
            "targets": choices[label],
            "choices": choices,
            "label": label,
            "idx": idx,
        }


def _kobest_dataset_fn(
    task: str, files: Mapping[str, Path], sentineg_prompt: str
) -> Callable[..., tf.data.Dataset]:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one file per split; seqio's Task shuffles examples itself
        path = files[split]
        return tf.data.Dataset.from_generator(
            lambda: kobest_examples(task, path, sentineg_prompt=sentineg_prompt),
            output_signature={
                "inputs": tf.TensorSpec([], tf.string),
                "targets": tf.TensorSpec([], tf.string),
                "choices": tf.TensorSpec([None], tf.string),
                "label": tf.TensorSpec([], tf.int32),
                "idx": tf.TensorSpec([], tf.int32),
            },
        )

    return dataset_fn


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def register_kobest_tasks(
    data_dir: str | os.PathLike,
    vocabulary: PolyglotVocabulary,
    *,
    prefix: str = "kobest",
    tasks: Sequence[str] = KOBEST_TASKS,
    sentineg_prompt: str = SENTINEG_HARNESS_PROMPT,
) -> seqio.Mixture:
    """Registers `{prefix}_{task}` for each KoBEST task and the Mixture `{prefix}` over them at
    equal rates (each replacing any earlier registration of that name); returns the Mixture.

    `data_dir/{task}/{split}.jsonl` give the splits (train, validation, test, and sentineg's
    test_originated). `inputs` and `targets` are tokenized without eos; the raw `choices`,
    `label` and `idx` ride along for rank classification and scoring."""
    names = []
    for task in tasks:
        files = kobest_splits(data_dir, task)
        source = seqio.FunctionDataSource(
            _kobest_dataset_fn(task, files, sentineg_prompt),
            splits=list(files),
            num_input_examples={split: _count_lines(p) for split, p in files.items()},
        )
        name = f"{prefix}_{task}"
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=source,
            output_features={
                key: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=1)
                for key in ("inputs", "targets")
            },
            preprocessors=[seqio.preprocessors.tokenize],
        )
        names.append(name)
    seqio.MixtureRegistry.remove(prefix)
    return seqio.MixtureRegistry.add(prefix, names, default_rate=1.0)
