"""The device kinds `polyglot-jax plan` knows: memory, bf16 peak and interconnect, one row each.

Conventions (every row, so that rows compare):
  memory_bytes          HBM per device, bytes (GiB = 2**30: the figure the driver / runtime reports).
  peak_flops            dense bf16 FLOP/s per device (no 2:4 sparsity).
  intra_node_bw         bytes/s one device can send while receiving as much, over the fast
                        interconnect (NVLink / ICI): half the datasheet's bidirectional figure.
  inter_node_bw         bytes/s per device over the network between nodes (InfiniBand / DCN), one
                        direction; GPU nodes are rail-optimised (one NIC per GPU).
  devices_per_node      how many devices the fast interconnect joins: an NVLink node of 8 GPUs; for
                        TPUs the largest single slice (ICI spans the slice, not just one host).
  devices_per_host      devices per machine (what one process drives); informational.
  memory_fraction       the share of HBM the planner lets a step use (see `USABLE_MEMORY_FRACTION`).
  source                where the numbers come from.

Numbers not on a datasheet are assumptions and say so in `source`.
"""

from __future__ import annotations

import dataclasses

from polyglot_jax.errors import ConfigError

GiB = 2**30

# JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION = 0.75 of a GPU by default; a training run sets it
# higher (0.9 is common). The planner allows 0.9 of HBM for the step's buffers: the rest covers the
# CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and allocator fragmentation, which the
# compiled step's memory analysis does not count. TPUs reserve less, but the same margin keeps plans
# comparable. `plan --memory_fraction` overrides it.
USABLE_MEMORY_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """One accelerator kind; the module docstring gives every field's unit."""

    name: str
    memory_bytes: int
    peak_flops: float
    intra_node_bw: float
    inter_node_bw: float
    devices_per_node: int
    devices_per_host: int
    source: str
    memory_fraction: float = USABLE_MEMORY_FRACTION

    @property
    def usable_bytes(self) -> int:
        """HBM bytes a step may use under `memory_fraction`."""
        return int(self.memory_bytes * self.memory_fraction)


_NVIDIA_A100 = (
    "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/a100): BF16 312 TFLOPS dense (624 with "
    "sparsity), NVLink 600 GB/s bidirectional (300 GB/s each way); DGX A100 user guide: 8 x "
    "ConnectX-6 HDR InfiniBand 200 Gb/s compute NICs per 8-GPU node (25 GB/s per GPU)"
)
_NVIDIA_HOPPER = (
    "BF16 1,979 TFLOPS with sparsity = 989 dense, NVLink 900 GB/s bidirectional (450 GB/s each "
    "way); DGX H100/H200: 8 x ConnectX-7 400 Gb/s NDR InfiniBand per 8-GPU node (50 GB/s per GPU)"
)
_DCN_ASSUMED = (
    "DCN per chip not on this page: assumed v5p's documented 50 Gb/s per chip (6.25 GB/s)"
)

DEVICE_KINDS: dict[str, DeviceKind] = {
    k.name: k
    for k in (
        DeviceKind(
            name="a100-40gb",
            memory_bytes=40 * GiB,
            peak_flops=312e12,
            intra_node_bw=300e9,
            inter_node_bw=25e9,
            devices_per_node=8,
            devices_per_host=8,
            source=f"A100-SXM4 40 GB HBM2; {_NVIDIA_A100}",
        ),
        DeviceKind(
            name="a100-80gb",
            memory_bytes=80 * GiB,
            peak_flops=312e12,
            intra_node_bw=300e9,
            inter_node_bw=25e9,
            devices_per_node=8,
            devices_per_host=8,
            source=f"A100-SXM4 80 GB HBM2e; {_NVIDIA_A100}",
        ),
        DeviceKind(
            name="h100-80gb",
            memory_bytes=80 * GiB,
            peak_flops=989e12,
            intra_node_bw=450e9,
            inter_node_bw=50e9,
            devices_per_node=8,
            devices_per_host=8,
            source=f"NVIDIA H100 SXM5 datasheet (nvidia.com/h100): 80 GB HBM3, {_NVIDIA_HOPPER}",
        ),
        DeviceKind(
            name="h200",
            memory_bytes=140 * GiB,
            peak_flops=989e12,
            intra_node_bw=450e9,
            inter_node_bw=50e9,
            devices_per_node=8,
            devices_per_host=8,
            source=(
                "NVIDIA H200 SXM datasheet (nvidia.com/h200): 141 GB HBM3e (the driver reports "
                f"about 140 GiB; about 139 GiB free to JAX on the H200 seen here), {_NVIDIA_HOPPER}"
            ),
        ),
        DeviceKind(
            name="tpu-v4",
            memory_bytes=32 * GiB,
            peak_flops=275e12,
            # Cloud TPU v4 page: all-reduce bandwidth per Pod 1.1 PB/s over 4096 chips.
            intra_node_bw=1.1e15 / 4096,
            inter_node_bw=6.25e9,
            devices_per_node=4096,
            devices_per_host=4,
            source=(
                "Cloud TPU v4 (cloud.google.com/tpu/docs/v4): 275 TFLOPS bf16, 32 GiB HBM2, "
                "4096-chip pod, all-reduce bandwidth 1.1 PB/s per pod (268 GB/s per chip), "
                f"4 chips per host; {_DCN_ASSUMED}"
            ),
        ),
        DeviceKind(
            name="tpu-v5p",
            memory_bytes=95 * GiB,
            peak_flops=459e12,
            intra_node_bw=600e9,
            inter_node_bw=6.25e9,
            devices_per_node=6144,
            devices_per_host=4,
            source=(
                "Cloud TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOPS bf16, 95 GiB HBM2e, "
                "ICI 1200 GB/s bidirectional per chip, DCN 50 Gb/s per chip, largest single slice "
                "6144 chips, 4 chips per host"
            ),
        ),
        DeviceKind(
            name="tpu-v6e",
            memory_bytes=32 * GiB,
            peak_flops=918e12,
            intra_node_bw=400e9,
            inter_node_bw=6.25e9,
            devices_per_node=256,
            devices_per_host=8,
            source=(
                "Cloud TPU v6e (cloud.google.com/tpu/docs/v6e): 918 TFLOPS bf16, 32 GB HBM, ICI "
                "800 GB/s bidirectional per chip, 256-chip pod, 8 chips per host; "
                f"{_DCN_ASSUMED}"
            ),
        ),
    )
}


def device_kind(name: str) -> DeviceKind:
    """The row for `name` (case-insensitive); ConfigError listing the known kinds otherwise."""
    kind = DEVICE_KINDS.get(str(name).strip().lower())
    if kind is None:
        raise ConfigError(
            f"--device_kind={name!r} is not known; known kinds: {', '.join(DEVICE_KINDS)}"
        )
    return kind
