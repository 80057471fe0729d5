"""
Shared utilities: base directory, device/dtype detection, distributed init/teardown, logging.
"""

import logging
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Logging: a small colored logger; only rank 0 prints by default.


class _ColoredFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
              "CRITICAL": "\033[35m"}

    def format(self, record):
        msg = super().format(record)
        if sys.stderr.isatty():
            color = self.COLORS.get(record.levelname, "")
            return f"{color}{msg}\033[0m"
        return msg


def setup_logger(name="nanochat", level=logging.INFO):
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_ColoredFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return logger


logger = setup_logger()


def print0(*args, **kwargs):
    """print() on rank 0 only (flushes, so progress shows up in pipes and logs)."""
    if int(os.environ.get("RANK", 0)) == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# Files


def get_base_dir():
    """Where tokenizer, data, checkpoints and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write_bytes(path, data: bytes):
    """Write via temp file + fsync + rename, so a crash never leaves a half-written file under `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Device, dtype, distributed

DEVICE_TYPES = ("cuda", "mps", "cpu")


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
        raise ValueError(f"--device_type={device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device_type=cuda was requested but torch.cuda.is_available() is False")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device_type=mps was requested but MPS is not available")
    return device_type


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


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def measure_cpu_matmul_flops(n=1024, repeats=5):
    """FLOP/s of a large fp32 matmul on this CPU: the best a CPU reaches, used as its 'peak' for MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def get_peak_flops(device_type, device_name=None):
    """Peak dense FLOP/s of the device, for MFU: bf16 tensor-core peak on known GPUs, a measured fp32 matmul on
    CPU. Unknown devices return None (MFU is then omitted)."""
    if device_type == "cpu":
        return measure_cpu_matmul_flops()
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


class DummyWandb:
    """Stand-in for a wandb run when --run=dummy (the default): logging becomes a no-op."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


# -----------------------------------------------------------------------------
# Command line: every script accepts --key=value and --key value, dashes or underscores
# (--model-type == --model_type), and ignores a leading "--" (torchrun's `-m scripts.x -- --flags` form).


def normalize_argv(argv):
    out = []
    for i, arg in enumerate(argv):
        if arg == "--" and i == 0:
            continue
        if arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg[2:].partition("=")
            arg = "--" + key.replace("-", "_") + sep + value
        out.append(arg)
    return out


def parse_args(parser, argv=None):
    """argparse with the conventions above; argv defaults to sys.argv[1:]."""
    return parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))


def str2bool(value):
    """For flags like --qk_norm=False: argparse's bool('False') would be True."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


class UserError(Exception):
    """A problem the user can fix (wrong flag, missing or mismatched checkpoint, ...): scripts print the message,
    which says what to do, without a traceback."""


def run_cli(main):
    """Entry point of a script: run main(), turning UserError into a one-line message and exit status 1."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
