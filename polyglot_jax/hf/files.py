"""The files of a Hugging Face model directory: `config.json` (checked), a streaming sharded-safetensors
writer, and a reader of safetensors or `pytorch_model.bin` weights one tensor at a time.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON (`{key: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the data that
follows), then the tensors' bytes back to back. All shapes and dtypes are known before any data is
converted, so the writer lays out every file first (header written, file extended to its final
size) and then writes each tensor, or any box of it, straight to its place: peak memory is one
block, not a shard. The `safetensors` package only writes whole in-memory dicts.

Files are named as `transformers` names them: `model.safetensors`, or `model-00001-of-00003.safetensors`
... with `model.safetensors.index.json` (`weight_map`: key -> file) when there are several.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from polyglot_jax.errors import InputError
from polyglot_jax.hf.mapping import from_hf_config

SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in "5GB" (decimal units, as transformers reads them), "512MiB" (binary) or "1000"."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise InputError(f"size {text!r} is not a number of bytes like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise InputError(f"size {text!r} must be positive")
    return value


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the output: its key, dtype and shape."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups of `entries`, each at most `max_shard_bytes` of tensor data unless a
    single tensor is larger (it then fills a shard alone)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(entries: Sequence[TensorEntry], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included, padded to 8 bytes) and each entry's data offset."""
    fields: dict[str, Any] = {"__metadata__": metadata}
    offsets, position = [], 0
    for e in entries:
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{e.key}: dtype {e.dtype} has no safetensors code")
        fields[e.key] = {
            "dtype": SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [position, position + e.nbytes],
        }
        offsets.append(position)
        position += e.nbytes
    text = json.dumps(fields, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data then starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, offsets


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class ShardedSafetensorsWriter:
    """Writes `entries` into `directory` as one or several safetensors files.

    Every tensor must then be written in full, with `write` (the whole tensor) or `write_box`
    (non-overlapping boxes that together cover it); `close` checks that and writes the index.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        entries: Sequence[TensorEntry],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = pathlib.Path(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, TensorEntry]] = {}  # key -> (file no, offset, entry)
        self._written: dict[str, int] = {}
        self._staging: np.ndarray | None = None
        for number, (name, shard) in enumerate(zip(self.files, self.shards, strict=True)):
            header, offsets = _header(shard, metadata or {"format": "pt"})
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(e.nbytes for e in shard))
            for entry, offset in zip(shard, offsets, strict=True):
                if entry.key in self._where:
                    raise ValueError(f"tensor {entry.key} is listed twice")
                self._where[entry.key] = (number, len(header) + offset, entry)
                self._written[entry.key] = 0

    def write(self, key: str, array: np.ndarray) -> None:
        """The whole tensor `key` (any dtype, cast to the entry's; the shape must match)."""
        entry = self._where[key][2]
        if tuple(array.shape) != entry.shape:
            raise ValueError(f"{key}: shape {array.shape} != {entry.shape}")
        self.write_box(key, entry.shape, tuple(slice(None) for _ in entry.shape), array)

    def write_box(
        self, key: str, view_shape: tuple[int, ...], index: tuple[slice, ...], array: np.ndarray
    ) -> None:
        """`array` into box `index` of tensor `key` viewed (row-major) with shape `view_shape`.

        `array` may be strided (e.g. a transposed view) and of another float dtype: the cast and
        the copy into the file's layout are one pass."""
        number, offset, entry = self._where[key]
        if math.prod(view_shape) != math.prod(entry.shape):
            raise ValueError(f"{key}: view {view_shape} does not hold {entry.shape}")
        whole = all(
            s.start in (0, None) and s.stop in (n, None)
            for s, n in zip(index, view_shape, strict=True)
        )
        if whole:
            buffer = self._buffer(view_shape, entry.dtype)
            np.copyto(buffer, array, casting="same_kind")
            _pwrite_all(self._fds[number], buffer, offset)
        else:
            target = np.memmap(
                self.directory / self.files[number],
                dtype=entry.dtype,
                mode="r+",
                offset=offset,
                shape=view_shape,
            )
            np.copyto(target[index], array, casting="same_kind")
            target.flush()
            del target  # unmaps: the written pages leave this process's memory
        self._written[key] += array.size

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A staging buffer, reused while consecutive tensors share a shape (no page faults)."""
        if self._staging is None or self._staging.shape != shape or self._staging.dtype != dtype:
            self._staging = None
            self._staging = np.empty(shape, dtype)
        return self._staging

    def close(self) -> list[pathlib.Path]:
        """Checks completeness, closes the files, writes the index when sharded; returns the files."""
        self.abort()
        for key, (_, _, entry) in self._where.items():
            if self._written[key] != math.prod(entry.shape):
                raise RuntimeError(
                    f"{key}: {self._written[key]} of {math.prod(entry.shape)} written"
                )
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for _, _, e in self._where.values())},
                "weight_map": {
                    e.key: name
                    for name, shard in zip(self.files, self.shards, strict=True)
                    for e in shard
                },
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / name for name in self.files]

    def abort(self) -> None:
        """Closes the files (the caller removes them)."""
        for fd in self._fds:
            os.close(fd)
        self._fds, self._staging = [], None


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """`hf_dir/config.json`, with every architecture field checked (InputError naming the file and
    the field), so that `from-hf` and `generate --hf` fail before loading or writing anything."""
    file = pathlib.Path(hf_dir) / "config.json"
    if not file.is_file():
        raise InputError(f"{file} does not exist: not a Hugging Face model directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{file}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{file}: not a JSON object ({type(data).__name__})")
    from_hf_config(data, source=str(file))
    return data


class HFWeights:
    """The tensors of a Hugging Face model directory, read one at a time.

    Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or, when
    torch is installed, `pytorch_model.bin` / its sharded index (`torch.load(weights_only=True,
    mmap=True)`: tensors stay on disk until read; legacy pickles without the zip format are not
    supported). Keys are as stored. A file is mapped only while its tensors are copied out (a
    safetensors file per tensor, a .bin file until a tensor of another file is asked for), so
    the mapped pages of a whole model never add up in this process's memory.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._sources: dict[str, Any] = {}  # key -> safetensors file or ("torch", file)
        self._torch_open: tuple[pathlib.Path, dict[str, Any]] | None = None
        d = self.directory
        if (d / INDEX_FILE).is_file():
            self._open_safetensors(self._index_files(d / INDEX_FILE))
        elif (d / SINGLE_FILE).is_file():
            self._open_safetensors([d / SINGLE_FILE])
        elif (d / "pytorch_model.bin.index.json").is_file():
            self._open_torch(self._index_files(d / "pytorch_model.bin.index.json"))
        elif (d / "pytorch_model.bin").is_file():
            self._open_torch([d / "pytorch_model.bin"])
        else:
            raise InputError(f"{d}: no {SINGLE_FILE}, {INDEX_FILE}, pytorch_model.bin or its index")

    def _index_files(self, index_file: pathlib.Path) -> list[pathlib.Path]:
        """The weight files an index names, each checked to be a file inside the directory."""
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{index_file}: not readable JSON ({e})") from e
        if not isinstance(index, dict) or "weight_map" not in index:
            raise InputError(f"{index_file}: not a weight index (no weight_map field)")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(
                f"{index_file}: weight_map must be a non-empty JSON object (tensor -> file), "
                f"not {type(weight_map).__name__}"
            )
        files = []
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"{index_file}: weight_map[{key!r}]={name!r} is not a file name")
            # Only files of this directory: an index must not make us read `../x` or `/etc/x`.
            relative = pathlib.PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts or "\\" in name:
                raise InputError(
                    f"{index_file}: weight_map[{key!r}]={name!r} names a file outside "
                    f"{self.directory}"
                )
            files.append(self.directory / relative)
        files = list(dict.fromkeys(files))
        for f in files:
            if not f.is_file():
                raise InputError(f"{index_file} names {f.name}, which does not exist")
        return files

    def _open_safetensors(self, files: list[pathlib.Path]) -> None:
        from safetensors import SafetensorError, safe_open

        for file in files:
            try:
                with safe_open(str(file), framework="np") as handle:
                    for key in handle.keys():
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
                        self._sources[key] = file
            except (SafetensorError, OSError) as e:
                raise InputError(f"{file}: not a readable safetensors file ({e})") from e

    def _open_torch(self, files: list[pathlib.Path]) -> None:
        for file in files:
            for key, tensor in self._torch_state(file).items():
                self._shapes[key] = tuple(tensor.shape)
                self._sources[key] = ("torch", file)
        self._torch_open = None

    def _torch_state(self, file: pathlib.Path) -> dict[str, Any]:
        """One .bin file, memory-mapped; the previous one is dropped (unmapped) first."""
        if self._torch_open is not None and self._torch_open[0] == file:
            return self._torch_open[1]
        self._torch_open = None
        try:
            import torch
        except ImportError:
            raise InputError(
                f"{self.directory} holds pytorch_model.bin only: reading it needs torch "
                "(pip install torch), or convert it to safetensors first"
            ) from None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise InputError(f"{file}: not a loadable torch state dict ({e})") from e
        self._torch_open = (file, state)
        return state

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array in its stored dtype (bfloat16 as ml_dtypes')."""
        source = self._sources[key]
        if isinstance(source, pathlib.Path):
            from safetensors import safe_open

            with safe_open(str(source), framework="np") as handle:
                return handle.get_tensor(key)
        import torch

        tensor = self._torch_state(source[1])[key].detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()

    def close(self) -> None:
        self._sources.clear()
        self._torch_open = None
