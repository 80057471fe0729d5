"""
Model FLOPs utilisation: the peak FLOP/s of the device (a table for GPUs, a measured and cached matmul on CPU) and
MFU from FLOPs per token and tokens per second; peak memory of the process.
"""

import json
import os
import platform
import sys
import time

import torch

from nanochat.fileio import FileError, atomic_write_bytes, get_base_dir, read_json
from nanochat.log import print0

# A CPU's peak for MFU: the best of several timed fp32 matmuls of the size a small model multiplies (1024 x 1024 is
# ~2 GFLOP, tens of ms). The best is the peak; median / best says how much other work got in the way.
CPU_PEAK_SIZE, CPU_PEAK_TRIALS = 1024, 10
CPU_PEAK_MAX_SPREAD = 1.5  # above this the machine was busy: even the best trial may be slowed, so no figure


def measure_cpu_matmul_flops(n=CPU_PEAK_SIZE, trials=CPU_PEAK_TRIALS):
    """(best FLOP/s, median time / best time) of `trials` timed n x n fp32 matmuls, after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[0], times[len(times) // 2] / times[0]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_peak_key():
    """What the peak depends on: the CPU model and the number of threads torch computes with."""
    return f"{cpu_name()} / {torch.get_num_threads()} threads"


def cpu_peak_path():
    return os.path.join(get_base_dir(), "cpu_peak_flops.json")


def read_cpu_peaks():
    try:
        peaks = read_json(cpu_peak_path())
    except FileError:  # missing or damaged: measured again
        return {}
    return peaks if isinstance(peaks, dict) else {}


def forget_cpu_peak():
    """Drop this machine's cached peak (it proved too low), so the next run measures it again."""
    peaks = read_cpu_peaks()
    if peaks.pop(cpu_peak_key(), None) is not None:
        atomic_write_bytes(cpu_peak_path(), json.dumps(peaks, indent=1).encode())


def cpu_peak_flops():
    """This CPU's fp32 peak FLOP/s for MFU, cached per CPU model and thread count in the base dir: measured once,
    then read back, so a training run under load never re-measures it lower. None when the measurement is not
    trustworthy (the trials spread by more than CPU_PEAK_MAX_SPREAD): MFU is then printed as n/a."""
    key = cpu_peak_key()
    cached = read_cpu_peaks().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("flops"), (int, float)) and cached["flops"] > 0:
        return float(cached["flops"])
    flops, spread = measure_cpu_matmul_flops()
    if spread > CPU_PEAK_MAX_SPREAD:
        print0(f"MFU n/a: the CPU peak could not be measured reliably (matmul trials spread {spread:.2f}x, the "
               f"machine is busy); it is measured again at the next run")
        return None
    peaks = read_cpu_peaks()
    peaks[key] = {"flops": flops, "spread": round(spread, 3), "matmul": CPU_PEAK_SIZE,
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_bytes(cpu_peak_path(), json.dumps(peaks, indent=1).encode())
    return flops


def mfu_percent(flops_per_token, tok_per_sec, peak_flops, world_size=1):
    """Model FLOPs utilisation in %, or None (printed n/a) without a peak or above 100%, which only a wrong
    (too low) peak can give."""
    if not peak_flops:
        return None
    mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size)
    return mfu if mfu <= 100 else None


def get_peak_flops(device_type, device_name=None):
    """Peak dense FLOP/s of the device, for MFU: bf16 tensor-core peak on known GPUs, a measured (cached) fp32
    matmul on CPU. Unknown devices, or a CPU that could not be measured reliably, return None (MFU n/a)."""
    if device_type == "cpu":
        return cpu_peak_flops()
    if device_type != "cuda":
        return None
    name = (device_name or torch.cuda.get_device_name()).upper()
    table = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 125e12),
             ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]
    for key, flops in table:
        if key in name:
            return flops
    return None




def peak_memory(device_type):
    """Bytes at the high-water mark so far: what CUDA tensors have held (max allocated) on CUDA; elsewhere what the
    OS counts for this process (max RSS: weights, optimizer state and activations, plus Python and torch's own
    ~0.5-1 GB). None where the OS does not say (Windows)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kilobytes on Linux
