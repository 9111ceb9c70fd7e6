"""Peak dense throughput and memory bandwidth of the devices we report "% of peak" against.

Numbers are the vendors' datasheet figures for dense math (no 2:4 sparsity): tensor-core TFLOP/s for fp16/bf16,
plain (non-tensor-core) TFLOP/s for fp32, and HBM bandwidth in GB/s (1e9 bytes/s). A device not in the table gets
no "% of peak" column rather than a guessed one. On the CPU nothing is assumed: ``apt bench`` measures a large
tensor copy (read + write) and reports memory-bound kernels against that measured bandwidth, stating so.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# name fragment (lower case, most specific first) -> (bf16/fp16 TFLOP/s, fp32 TFLOP/s, HBM GB/s)
DEVICE_PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    ("gh200", (989.0, 67.0, 4000.0)),         # GH200 96 GB HBM3 (the 144 GB HBM3e part: 4900 GB/s)
    ("h200 nvl", (835.0, 60.0, 4800.0)),      # H200 NVL 141 GB HBM3e
    ("h200", (989.0, 67.0, 4800.0)),          # H200 SXM 141 GB HBM3e
    ("h100 nvl", (835.0, 60.0, 3900.0)),      # H100 NVL 94 GB
    ("h100 pcie", (756.0, 51.0, 2000.0)),     # H100 PCIe 80 GB HBM2e
    ("h100", (989.0, 67.0, 3350.0)),          # H100 SXM5 80 GB HBM3
    ("a100-sxm4-80gb", (312.0, 19.5, 2039.0)),
    ("a100 80gb pcie", (312.0, 19.5, 1935.0)),
    ("a100-pcie-40gb", (312.0, 19.5, 1555.0)),
    ("a100", (312.0, 19.5, 1555.0)),          # A100 40 GB (SXM4)
]

_cpu_bandwidth: Optional[float] = None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name}"


def lookup(name: str) -> Optional[tuple[float, float, float]]:
    low = name.lower()
    for frag, vals in DEVICE_PEAKS:
        if frag in low:
            return vals
    return None


def device_peaks(device: torch.device | str, dtype: torch.dtype) -> tuple[Optional[float], Optional[float]]:
    """(peak FLOP/s for ``dtype``, peak bytes/s) of the device; None where unknown. On the CPU the FLOP peak is
    unknown and the bandwidth is the measured copy bandwidth, if :func:`measure_cpu_copy_bandwidth` ran."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, _cpu_bandwidth
    vals = lookup(device_name(device))
    if vals is None:
        return None, None
    half, fp32, bw = vals
    flops = half if dtype in (torch.float16, torch.bfloat16) else fp32 if dtype == torch.float32 else None
    return (flops * 1e12 if flops else None), bw * 1e9


def measure_cpu_copy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes/s moved by ``dst.copy_(src)`` of a ``nbytes`` fp32 tensor (counted as read + write), best of
    ``repeats``. The result is cached and used as the CPU's bandwidth 'peak'."""
    global _cpu_bandwidth
    n = max(1, nbytes // 4)
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    _cpu_bandwidth = 2 * n * 4 / best
    logger.info("measured CPU copy bandwidth: %.1f GB/s", _cpu_bandwidth / 1e9)
    return _cpu_bandwidth
