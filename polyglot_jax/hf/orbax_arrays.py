"""The `params` item of an orbax checkpoint, read and written one block at a time with tensorstore.

orbax's own restore and save move whole pytrees; conversion of a 12.8B model on a 24 GB machine
cannot. This module opens the arrays inside a checkpoint directly, in the on-disk layout that
orbax (0.12) writes and reads:

    checkpoints/<step>/_CHECKPOINT_METADATA     item handlers and timestamps (JSON)
    checkpoints/<step>/params/_METADATA         the pytree: key paths, value types, flags
    checkpoints/<step>/params/manifest.ocdbt    one OCDBT key-value store for every array...
    checkpoints/<step>/params/d/...             ...holding zarr arrays named by the joined key path
                                                ("layers.mlp.up_kernel/.zarray", chunk files)
    checkpoints/<step>/params/_sharding         the sharding each array was saved with (JSON)
    checkpoints/<step>/params/array_metadatas/  write and chunk shapes per process (JSON)

Checkpoints saved by many processes keep per-process stores (`ocdbt.process_N/`) that orbax merges
into the root manifest, so opening the root reads every array whatever mesh saved it. Reads go
storage chunk by storage chunk. A chunk spans all layers of a scanned stack (orbax never splits
the unsharded layer axis; chunks are cut at 2 GiB), so chunks in orbax's default format (zarr v2,
zstd or raw) are decompressed as a stream and handed out row by row; other formats (zarr3) go
through tensorstore with a one-chunk cache, so that each chunk is decoded once.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from polyglot_jax.errors import InputError

KeyPath = tuple[str, ...]
Index = tuple[slice, ...]

METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
_DICT_KEY = 2  # orbax KeyType.DICT
_STANDARD_HANDLER = (
    "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
)
# The OCDBT settings orbax writes with: small values (.zarray) inline, one large root node.
_OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "manifest_kind": "single",
}
_OCDBT_NODE_CACHE_BYTES = 100_000_000
BLOCK_BYTES = 64 << 20  # rows per block of an unstacked array: about this many bytes
_READ_BYTES = 16 << 20  # compressed bytes per read of a chunk


def storage_name(path: KeyPath) -> str:
    """The name orbax stores the array at key path `path` under: the keys joined by dots."""
    return ".".join(path)


def _base_context(chunk_cache_bytes: int = 0) -> ts.Context:
    return ts.Context(
        {
            "file_io_concurrency": {"limit": 32},
            "cache_pool": {"total_bytes_limit": int(chunk_cache_bytes)},
            "cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_NODE_CACHE_BYTES},
        }
    )


def _kvstore_spec(params_dir: pathlib.Path, name: str, use_ocdbt: bool) -> dict[str, Any]:
    if not use_ocdbt:  # one directory per array
        return {"driver": "file", "path": str(params_dir / name) + "/"}
    return {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": str(params_dir) + "/"},
        "path": name + "/",
        "cache_pool": "cache_pool#ocdbt",
    }


def _chunk_boxes(shape: Sequence[int], chunk: Sequence[int]) -> Iterator[Index]:
    """The boxes of a regular chunk grid over `shape`, in row-major order of the grid."""
    ranges = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, shape, strict=True))


class CheckpointReader:
    """The arrays of one checkpoint's `params` item (a `checkpoints/<step>/params` directory).

    `paths` lists the key paths; `shape`, `dtype` and `chunk_shape` describe an array as stored
    (only its metadata is read); `blocks` yields its data in pieces.
    """

    def __init__(self, params_dir: str | os.PathLike):
        self.directory = pathlib.Path(params_dir).absolute()
        meta_file = self.directory / METADATA_FILE
        try:
            meta = json.loads(meta_file.read_text())
            tree = meta["tree_metadata"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{meta_file}: not a readable orbax pytree metadata file ({e})") from e
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.paths: list[KeyPath] = []
        for entry in tree.values():
            keys = entry.get("key_metadata", [])
            if any(k.get("key_type") != _DICT_KEY for k in keys):
                raise InputError(f"{meta_file}: params hold a non-dict node; expected nested dicts")
            self.paths.append(tuple(str(k["key"]) for k in keys))
        self._context = _base_context()
        self._stores: dict[KeyPath, ts.TensorStore] = {}
        self._kvstores: dict[str, ts.KvStore] = {}

    def _spec(self, path: KeyPath) -> dict[str, Any]:
        name = storage_name(path)
        return {
            "driver": "zarr3" if self.use_zarr3 else "zarr",
            "kvstore": _kvstore_spec(self.directory, name, self.use_ocdbt),
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
        }

    def store(self, path: KeyPath) -> ts.TensorStore:
        """The opened array at `path` (metadata only is read)."""
        if path not in self._stores:
            try:
                self._stores[path] = ts.open(
                    self._spec(path), open=True, read=True, context=self._context
                ).result()
            except (ValueError, RuntimeError) as e:
                raise InputError(
                    f"{self.directory}: cannot open the array {storage_name(path)} "
                    f"({str(e).splitlines()[0]})"
                ) from e
        return self._stores[path]

    def shape(self, path: KeyPath) -> tuple[int, ...]:
        return tuple(int(n) for n in self.store(path).shape)

    def dtype(self, path: KeyPath) -> np.dtype:
        return np.dtype(self.store(path).dtype.numpy_dtype)

    def chunk_shape(self, path: KeyPath) -> tuple[int, ...]:
        """The decoding unit: reading any element of a chunk decodes all of it."""
        store = self.store(path)
        chunk = store.chunk_layout.read_chunk.shape or store.shape
        return tuple(int(c) if c else int(n) for c, n in zip(chunk, store.shape, strict=True))

    def blocks(self, path: KeyPath, *, single_rows: bool) -> Iterator[tuple[Index, np.ndarray]]:
        """(index into the array, its data) covering the array at `path` once.

        Chunks in orbax's default format (zarr v2, zstd or raw, C order) are decompressed as
        streams: all chunks of a band of axis-0 rows at once, so that whole rows come out (one
        row at a time with `single_rows`, a layer of a scanned stack, else up to `BLOCK_BYTES`
        per block) and memory stays near one block however large the chunks. Other formats are
        read chunk by chunk with tensorstore through a one-chunk cache (memory: the chunk,
        compressed and decoded), in pieces that may cut rows.
        """
        shape, chunk, dtype = self.shape(path), self.chunk_shape(path), self.dtype(path)
        store = self.store(path)
        if not shape:
            yield (), store.read().result()
            return
        streamable = self._streamable(path)
        if streamable is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            rows = 1 if single_rows else max(1, BLOCK_BYTES // max(row_bytes, 1))
            for band in range(0, shape[0], chunk[0]):
                yield from self._streamed_band(path, streamable, band, chunk, rows)
            return
        row_bytes = math.prod(chunk[1:]) * dtype.itemsize
        rows = 1 if single_rows else max(1, BLOCK_BYTES // max(row_bytes, 1))
        if chunk[0] > 1:
            context = _base_context(math.prod(chunk) * dtype.itemsize + (1 << 20))
            store = ts.open(self._spec(path), open=True, read=True, context=context).result()
        for box in _chunk_boxes(shape, chunk):
            for r in range(box[0].start, box[0].stop, rows):
                index = (slice(r, min(r + rows, box[0].stop)), *box[1:])
                yield index, store[index].read().result()

    def _streamable(self, path: KeyPath) -> dict[str, Any] | None:
        """The zarr v2 metadata when its chunks are C-order arrays, raw or in one zstd frame."""
        if self.use_zarr3:
            return None
        meta = self.store(path).spec().to_json().get("metadata", {})
        compressor = meta.get("compressor")
        if meta.get("order", "C") != "C" or meta.get("filters"):
            return None
        if compressor is not None and compressor.get("id") != "zstd":
            return None
        return meta

    def _streamed_band(
        self, path: KeyPath, meta: dict[str, Any], band: int, chunk: tuple[int, ...], rows: int
    ) -> Iterator[tuple[Index, np.ndarray]]:
        """Whole rows `band : band + chunk[0]` of the array, assembled from one decompression
        stream per chunk of the band (zarr v2 stores edge chunks at full chunk size: the part
        outside the array is never handed out)."""
        import zstandard

        shape, dtype = self.shape(path), self.dtype(path)
        name = storage_name(path)
        if name not in self._kvstores:
            spec = _kvstore_spec(self.directory, name, self.use_ocdbt)
            self._kvstores[name] = ts.KvStore.open(spec, context=self._context).result()
        boxes = list(_chunk_boxes(shape[1:], chunk[1:]))
        read_bytes = max(1 << 20, _READ_BYTES // len(boxes))  # bounds the sum of read buffers
        streams = []
        for box in boxes:
            grid = [band // chunk[0]] + [s.start // c for s, c in zip(box, chunk[1:], strict=True)]
            key = meta.get("dimension_separator", ".").join(map(str, grid))
            label = f"{name}/{key}"
            stream: Any = _KvValueReader(self._kvstores[name], key, label, read_bytes)
            if meta.get("compressor") is not None:
                stream = zstandard.ZstdDecompressor().stream_reader(stream, read_size=read_bytes)
            streams.append((label, stream))
        direct = len(boxes) == 1 and tuple(chunk[1:]) == tuple(shape[1:])
        valid_rows = min(chunk[0], shape[0] - band)
        for r in range(0, valid_rows, rows):
            n = min(rows, valid_rows - r)
            block = np.empty((n, *shape[1:]), dtype)
            for box, (label, stream) in zip(boxes, streams, strict=True):
                data = block if direct else np.empty((n, *chunk[1:]), dtype)
                try:
                    _read_exactly(stream, data.reshape(-1).view(np.uint8), label)
                except zstandard.ZstdError as e:
                    raise InputError(f"checkpoint chunk {label} is corrupt ({e})") from e
                if not direct:
                    inner = tuple(slice(0, s.stop - s.start) for s in box)
                    block[(slice(None), *box)] = data[(slice(None), *inner)]
            yield (slice(band + r, band + r + n), *(slice(0, d) for d in shape[1:])), block


class _KvValueReader(io.RawIOBase):
    """A file-like view of one key-value store value, read in byte ranges of `read_bytes`."""

    def __init__(self, kvstore: ts.KvStore, key: str, label: str, read_bytes: int = _READ_BYTES):
        self._kv, self._key, self._label, self._offset = kvstore, key, label, 0
        self._read_bytes = read_bytes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to `size` (at most `read_bytes`) next bytes; the store's bytes object, uncopied."""
        limit = self._read_bytes
        want = limit if size is None or size < 0 else min(size, limit)
        try:
            result = self._kv.read(self._key, byte_range=slice(self._offset, self._offset + want))
            result = result.result()
        except ValueError:  # OUT_OF_RANGE: the value ends inside this range; read the rest
            result = self._kv.read(self._key, byte_range=slice(self._offset, None)).result()
        if result.state != "value":
            raise InputError(f"checkpoint chunk {self._label} is missing")
        self._offset += len(result.value)
        return result.value

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_exactly(stream: Any, target: np.ndarray, label: str) -> None:
    view, filled = memoryview(target), 0
    while filled < len(view):
        n = stream.readinto(view[filled:])
        if not n:
            raise InputError(f"checkpoint chunk {label} ends early (truncated or corrupt)")
        filled += n


class CheckpointWriter:
    """Writes a `params` item that orbax's `StandardRestore` reads, one chunk at a time.

    `arrays` maps each key path to (shape, dtype). Arrays whose key path is in `row_chunked`
    are stored one chunk per row of axis 0 (a layer of a scanned stack), others in chunks of
    about `BLOCK_BYTES` of whole rows; `chunk_shape` says which. Write whole chunks (a chunk
    written in parts is read back and rewritten) until every element is written, then call
    `finish`, which checks exactly that and writes orbax's metadata files. Data are raw
    (uncompressed: weights barely compress and the conversion is faster) zarr v2 arrays in one
    OCDBT store, as orbax writes them on one process.
    """

    def __init__(
        self,
        params_dir: str | os.PathLike,
        arrays: Mapping[KeyPath, tuple[tuple[int, ...], np.dtype]],
        *,
        row_chunked: set[KeyPath] | frozenset[KeyPath] = frozenset(),
    ):
        self.directory = pathlib.Path(params_dir).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.arrays = {p: (tuple(s), np.dtype(d)) for p, (s, d) in arrays.items()}
        self._context = _base_context()
        self._stores: dict[KeyPath, ts.TensorStore] = {}
        self._chunks: dict[KeyPath, tuple[int, ...]] = {}
        self._written = dict.fromkeys(self.arrays, 0)
        for path, (shape, dtype) in self.arrays.items():
            if not shape:
                chunk = shape
            elif path in row_chunked:
                chunk = (1, *shape[1:])
            else:
                row_bytes = math.prod(shape[1:]) * dtype.itemsize
                chunk = (min(shape[0], max(1, BLOCK_BYTES // max(row_bytes, 1))), *shape[1:])
            self._chunks[path] = tuple(max(1, c) for c in chunk)
            kvstore = _kvstore_spec(self.directory, storage_name(path), use_ocdbt=True)
            kvstore.update(config=_OCDBT_CONFIG, assume_config=True)
            spec = {
                "driver": "zarr",
                "kvstore": kvstore,
                "dtype": dtype.name,
                "metadata": {
                    "shape": list(shape),
                    "chunks": list(self._chunks[path]),
                    "compressor": None,
                },
                "store_data_equal_to_fill_value": True,
                "recheck_cached_data": False,
                "recheck_cached_metadata": False,
            }
            self._stores[path] = ts.open(spec, create=True, context=self._context).result()

    def chunk_shape(self, path: KeyPath) -> tuple[int, ...]:
        return self._chunks[path]

    def write(self, path: KeyPath, index: Index, value: np.ndarray, *, owned: bool = False) -> None:
        """Writes `value` (cast to the array's dtype) at `index` (slices, one per axis).

        `owned=True` promises that `value` is never modified afterwards, so tensorstore may keep
        it instead of copying it into a buffer of its own (fresh memory faults in page by page).
        """
        store = self._stores[path]
        data = np.asarray(value, dtype=self.arrays[path][1])
        reference = owned and data is value and data.flags.c_contiguous
        store[index].write(data, can_reference_source_data_indefinitely=reference).result()
        self._written[path] += int(np.size(value))

    def finish(self) -> None:
        """Checks that every array is complete and writes `_METADATA`, `_sharding` and
        `array_metadatas/process_0` the way orbax does after a single-device save."""
        for path, (shape, _) in self.arrays.items():
            if self._written[path] != math.prod(shape):
                raise RuntimeError(
                    f"{storage_name(path)}: {self._written[path]} of {math.prod(shape)} "
                    "elements written"
                )
        self._stores.clear()
        tree, sharding, array_metas = {}, {}, []
        device = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
        for path, (shape, _) in self.arrays.items():
            name = storage_name(path)
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in path],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": list(shape),
                },
            }
            sharding[base64.urlsafe_b64encode(name.encode()).decode()] = device
            array_metas.append(
                {
                    "array_metadata": {
                        "param_name": name,
                        "write_shape": list(shape),
                        "chunk_shape": list(self._chunks[path]),
                        "ext_metadata": None,
                    }
                }
            )
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": True,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        (self.directory / "array_metadatas").mkdir(exist_ok=True)
        (self.directory / "array_metadatas" / "process_0").write_text(
            json.dumps({"array_metadatas": array_metas})
        )
        (self.directory / "_sharding").write_text(json.dumps(sharding))
        (self.directory / METADATA_FILE).write_text(json.dumps(meta))


def write_step_metadata(step_dir: str | os.PathLike, items: Sequence[str] = ("params",)) -> None:
    """`checkpoints/<step>/_CHECKPOINT_METADATA` naming orbax's standard handler for `items`."""
    now = time.time_ns()
    meta = {
        "item_handlers": dict.fromkeys(items, _STANDARD_HANDLER),
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    (pathlib.Path(step_dir) / CHECKPOINT_METADATA_FILE).write_text(json.dumps(meta))
