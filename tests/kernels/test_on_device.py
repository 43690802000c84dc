"""The attention kernels compiled for the real GPU (no interpret mode): outputs, lse and gradients
against the float64 reference at the models' shapes (seq 2048, head_dim 128 and 256, rotary 64),
with each backend's default tiles, packed documents and a ragged length included.

On CPU these skip, saying so: the same kernels run there in interpret mode
(test_flash_attention.py, test_hopper.py) and are lowered for CUDA (test_lowering.py).
`bench/device_suite.sh` runs this file on the GPU.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import pytest
from attention_reference import run_case

GPU = jax.default_backend() == "gpu"
HOPPER = GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
NVIDIA_HERE = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
on_gpu = pytest.mark.skipif(
    not GPU, reason=f"needs a GPU (this run's backend is {jax.default_backend()})"
)


def test_a_gpu_on_this_machine_is_the_one_jax_runs_on():
    """tests/conftest.py defaults JAX_PLATFORMS to cpu; on a GPU machine the suite must lift that
    (bench/device_suite.sh does), or every test below would skip and prove nothing."""
    if NVIDIA_HERE:
        assert GPU, f"an NVIDIA GPU is here but jax runs on {jax.default_backend()} " + (
            f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})"
        )


CASES = [  # b, t, heads, head_dim, rotary_dim, packed documents
    (1, 2048, 4, 128, 64, 0),  # Polyglot-Ko 1.3B's heads, one document
    (1, 2048, 4, 128, 64, 4),  # packed documents (segments, per-document positions)
    (1, 2048, 2, 256, 64, 0),  # head_dim 256
    (2, 1000, 2, 128, 64, 3),  # a length that is no multiple of any tile
]


@on_gpu
@pytest.mark.parametrize("b,t,h,d,rot,docs", CASES)
@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_native_kernels_match_the_float64_reference(backend, b, t, h, d, rot, docs):
    if backend == "mosaic_gpu" and not HOPPER:
        pytest.skip("the Mosaic GPU kernels need an sm_90 (Hopper) GPU")
    run_case(
        b=b, t=t, h=h, d=d, rot=rot, causal=True, docs=docs, dtype=jnp.bfloat16, tiling=None,
        backend=backend, interpret=False,
    )  # fmt: skip


@on_gpu
def test_native_float32_matches_the_float64_reference():
    run_case(
        b=1, t=2048, h=2, d=128, rot=64, causal=True, docs=2, dtype=jnp.float32, tiling=None,
        backend="triton", interpret=False,
    )  # fmt: skip
