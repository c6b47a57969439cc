"""Hardware profiles the cost model maps FLOPs and bytes onto (no jax).

Every constant is a vendor datasheet figure, a PAPER.md fact, or (for "cpu") a measurement on this
machine; efficiency factors are assumptions that `CostModel.fit` replaces with fitted coefficients when
step times have been measured. Bandwidths are bytes/s, FLOPs are dense (no sparsity) per second.

`python -m schedulers.hardware` (`__main__.py`) re-measures this CPU. A package, so that the command line is a module
of its own: the `schedulers` package imports this one (the cost model's profiles), and running a module the package
had imported made runpy warn and execute a second copy of it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time

from dualpath_jax.registry import Registry

GBPS = 1e9 / 8  # bytes/s in one Gbit/s
# Rates and efficiencies the cost model turns FLOPs and bytes into seconds with
_RATES = (
    "peak_flops",
    "hbm_bandwidth",
    "cnic_bandwidth",
    "snic_bandwidth",
    "host_mem_bandwidth",
    "mfu",
    "attention_efficiency",
    "hbm_efficiency",
)


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """One node type: `gpus_per_node` accelerators, one CNIC per accelerator, one SNIC per node.

    `peak_flops` is the dense bf16 peak of one accelerator; `peak_flops_fp8` the FP8 peak (used for the
    linear layers of models whose weights are 1 byte). `mfu` and `attention_efficiency` are the fractions
    of peak reached by the GEMMs and the attention kernels in prefill; `hbm_efficiency` the fraction of
    HBM bandwidth reached by decode's weight/KV streaming. `step_overhead_s` is a fixed per-forward cost
    (kernel launches, host scheduling, EP dispatch latency).

    The cluster simulator takes compute and HBM from a profile (`config.cluster.hardware`), and its links and nodes
    from `config.cluster` (`snic_gbps`, `cnic_gbps`, `dram_gbps` in GB/s, `gpus_per_node`, `host_buffer_gb`): a
    profile's NIC, GPU-count, host-memory and buffer figures reach a simulation only through those fields (it warns
    where one is left at its default and the profile gives another, `sim.config.warn_hardware_figures`).
    """

    name: str
    peak_flops: float  # bf16 dense FLOP/s per accelerator
    hbm_bandwidth: float  # B/s per accelerator
    hbm_bytes: float  # B per accelerator
    cnic_bandwidth: float  # B/s per accelerator (compute-network NIC), PAPER.md: B
    snic_bandwidth: float  # B/s per node (storage NIC), PAPER.md: s*B
    gpus_per_node: int  # PAPER.md: g
    host_mem_bandwidth: float  # B/s per node, PAPER.md: M
    host_buffer_bytes: float  # DRAM per node reserved for KV buffers
    peak_flops_fp8: float = 0.0  # 0: same as peak_flops
    mfu: float = 0.55  # achieved/peak for prefill GEMMs [assumption: typical large-batch Hopper prefill]
    attention_efficiency: float = 0.45  # achieved/peak for prefill attention [assumption]
    hbm_efficiency: float = 0.8  # achieved/peak HBM bandwidth in decode [assumption]
    step_overhead_s: float = 0.002  # per-forward fixed cost [assumption]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"HardwareProfile name must be a non-empty string, got {self.name!r}")
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            # (a string or a bool skipped this check; inf passed it and made times 0 or counts endless)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"HardwareProfile {self.name!r}: {f.name} must be a number, got {v!r}")
            if not v >= 0:  # NaN too
                raise ValueError(f"HardwareProfile {self.name!r}: {f.name} must be >= 0, got {v}")
            if not math.isfinite(v):
                raise ValueError(f"HardwareProfile {self.name!r}: {f.name} must be finite, got {v}")
        g = self.gpus_per_node
        if g < 1 or g != int(g):  # a fractional GPU count was accepted (and an infinite one)
            raise ValueError(f"HardwareProfile {self.name!r}: gpus_per_node must be a whole number >= 1, got {g!r}")
        object.__setattr__(self, "gpus_per_node", int(g))  # (8.0 -> 8)
        for name in _RATES:  # the cost model divides by these (0: ZeroDivisionError or α of 1 token)
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareProfile {self.name!r}: {name} must be > 0, got {getattr(self, name)}")

    def linear_peak(self, weight_bytes: int) -> float:
        """Peak FLOP/s of the linear layers for weights of `weight_bytes` bytes (FP8 GEMMs for 1-byte)."""
        if weight_bytes == 1 and self.peak_flops_fp8 > 0:
            return self.peak_flops_fp8
        return self.peak_flops


HARDWARE: Registry[HardwareProfile] = Registry("hardware profile")

# The paper's testbed (PAPER.md "Hardware"): Hopper H800 (H100 compute, 400 Gbps per-GPU NIC),
# 8 GPUs a node, one 400 Gbps CNIC per GPU, one extra 400 Gbps SNIC per node, M ~ 500 GB/s.
# Datasheet: H100/H800 SXM 989 TFLOP/s bf16 dense, 1979 FP8 dense, 3.35 TB/s HBM3, 80 GB.
H800 = HardwareProfile(
    name="h800",
    peak_flops=989e12,
    peak_flops_fp8=1979e12,
    hbm_bandwidth=3.35e12,
    hbm_bytes=80e9,
    cnic_bandwidth=400 * GBPS,
    snic_bandwidth=400 * GBPS,
    gpus_per_node=8,
    host_mem_bandwidth=500e9,
    host_buffer_bytes=80e9,  # PAPER.md: 80 GB per node for the DeepSeek models (320 GB for Qwen 32B)
)
HARDWARE.add("h800", H800)
# H100 SXM: the same SMs and HBM as the H800; NICs as the paper's nodes (400 Gbps per GPU + one SNIC).
HARDWARE.add("h100", dataclasses.replace(H800, name="h100"))
# H200 SXM: H100 compute, 141 GB HBM3e at 4.8 TB/s.
HARDWARE.add("h200", dataclasses.replace(H800, name="h200", hbm_bandwidth=4.8e12, hbm_bytes=141e9))
# This machine (2 shared x86 cores, no accelerator): peak_flops and hbm_bandwidth ("HBM" = DRAM) from
# `measure_cpu_profile()` (numpy float32 GEMM 1024^3 and a 256 MiB copy), run 2026-11-23 while other jobs
# shared the cores; NIC figures are loopback-ish placeholders for the in-process runtime and are not used
# for any reported number. Re-measure with `python -m schedulers.hardware`.
HARDWARE.add(
    "cpu",
    HardwareProfile(
        name="cpu",
        peak_flops=194e9,  # measured: 193.7 GFLOP/s float32 GEMM
        hbm_bandwidth=33e9,  # measured: 33.4 GB/s copy (read + write)
        hbm_bytes=8e9,
        cnic_bandwidth=2e9,
        snic_bandwidth=1e9,
        gpus_per_node=1,
        host_mem_bandwidth=33e9,
        host_buffer_bytes=2e9,
        mfu=0.5,
        attention_efficiency=0.2,
        hbm_efficiency=0.6,
        step_overhead_s=0.001,
    ),
)


def get_hardware(name: str) -> HardwareProfile:
    return HARDWARE.get(name)


def measure_cpu_profile(repeats: int = 3) -> dict[str, float]:
    """Measure this host's GEMM FLOP/s and memory copy bandwidth with numpy (best of `repeats`)."""
    import numpy as np

    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    flops = 2 * n**3 / best
    src = np.ones(64 * 1024 * 1024, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    bw = 2 * src.nbytes / best  # read + write
    return {"peak_flops": flops, "mem_bandwidth": bw}
