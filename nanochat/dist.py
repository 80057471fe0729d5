"""
Devices and processes: the device type (cuda > mps > cpu, or the --device_type override), autocast, and
torch.distributed set-up from torchrun's environment.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.log import UserError

DEVICE_TYPES = ("cuda", "mps", "cpu")


class DeviceError(UserError, RuntimeError):
    """A device that was asked for and is not there."""


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device_type(device_type=None):
    """'' / None -> autodetect (cuda > mps > cpu); otherwise validate the override."""
    if not device_type:
        return autodetect_device_type()
    if device_type not in DEVICE_TYPES:
        raise DeviceError(f"--device_type={device_type!r} is not one of {', '.join(DEVICE_TYPES)} (or empty: "
                          f"autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device_type=cuda was asked for but this machine has no usable CUDA device "
                          f"(torch.cuda.is_available() is False); leave --device_type out to use "
                          f"{autodetect_device_type()}")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device_type=mps was asked for but MPS is not available; leave --device_type out to use "
                          f"{autodetect_device_type()}")
    return device_type


def _meminfo_available():
    """MemAvailable of /proc/meminfo, lowered to what this process's cgroup still allows (containers), or None."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f, open(usage_path) as g:
                limit, usage = f.read().strip(), int(g.read().strip())
            if limit.isdigit() and int(limit) < 1 << 60:
                free = min(free, max(0, int(limit) - usage))
            break
        except (OSError, ValueError):
            continue
    return free


def available_memory(device):
    """Bytes that can still be allocated on `device` (CUDA: free device memory; CPU: the kernel's MemAvailable and
    the cgroup's limit), or None where that cannot be known (MPS, meta, no /proc)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return _meminfo_available()
    return None


def autocast_dtype(device_type):
    """bf16 on CUDA (tensor cores); fp32 elsewhere: bf16 matmuls on CPU are ~25x slower than fp32."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def autocast_ctx(device_type):
    """Mixed precision where autocast_dtype says so (CUDA); plain fp32 elsewhere."""
    dtype = autocast_dtype(device_type)
    return torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type=None, seed=42):
    """Pick the device, seed RNGs, and join the process group when launched by torchrun.
    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = resolve_device_type(device_type)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # CPU/MPS multi-process: gloo
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def on_rank0(fn):
    """fn() on rank 0 alone, its result handed to every rank, so that one process prepares data while the others
    wait; a UserError on rank 0 is raised on every rank (as a UserError with the same message). Outside torchrun,
    fn()."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()
