"""The orbax `params` reader (tensorstore, block by block) on a layout orbax itself does not write:
edge chunks. The layouts orbax writes, and the writer, are covered through test_convert.py."""

import json

import numpy as np
import tensorstore as ts

from polyglot_jax.hf.orbax_arrays import BLOCK_BYTES, CheckpointReader


def test_reader_reassembles_rows_from_edge_chunks(tmp_path):
    """Chunks that do not divide the array (zarr v2 pads edge chunks): whole rows come out."""
    data = np.random.default_rng(0).standard_normal((7, 12, 5)).astype(np.float32)
    params_dir = tmp_path / "params"
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": "w/"},
        "metadata": {"shape": [7, 12, 5], "chunks": [3, 5, 5], "compressor": {"id": "zstd"}},
        "dtype": "float32",
        "create": True,
    }
    ts.open(spec).result().write(data).result()
    key = {"key_metadata": [{"key": "w", "key_type": 2}], "value_metadata": {}}
    (params_dir / "_METADATA").write_text(json.dumps({"tree_metadata": {"('w',)": key}}))
    reader = CheckpointReader(params_dir)
    assert reader.chunk_shape(("w",)) == (3, 5, 5)
    for single_rows in (True, False):
        out, rows = np.full(data.shape, np.nan, np.float32), []
        for index, block in reader.blocks(("w",), single_rows=single_rows):
            assert index[1:] == (slice(0, 12), slice(0, 5))  # whole rows
            out[index] = block
            rows.append(len(block))
        assert np.array_equal(out, data)
        assert rows == ([1] * 7 if single_rows else [3, 3, 1])  # one block per band: < BLOCK_BYTES
    assert data[:3].nbytes < BLOCK_BYTES
