"""
Shared utilities: base directory, device/dtype detection, distributed init/teardown, logging.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
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


class UserError(Exception):
    """A problem the user can fix (wrong flag, missing or mismatched checkpoint, ...): scripts print the message,
    which says what to do, without a traceback."""


def get_base_dir():
    """Where tokenizer, data, checkpoints and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write_bytes(path, data: bytes):
    """Write via temp file + fsync + rename, so a crash never leaves a half-written file under `path`.
    A kill mid-write leaves only `{path}.tmp.{pid}`, which remove_orphan_tmp_files() clears later."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


TMP_SUFFIX = re.compile(r"\.tmp(?:\.(\d+))?$")  # "x.tmp.<pid>" (atomic writes) or "x.tmp" (older downloads)


def pid_alive(pid):
    """Whether a process with this id runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: checks existence, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_orphan_tmp_files(directory, prefix=""):
    """Delete temp files (`*.tmp.<pid>`, `*.tmp`) in `directory` whose names start with `prefix` and whose writer
    is dead: leftovers of a process killed mid-write. A temp file of a live process (another DDP rank, another
    script saving here) is kept. Returns the removed paths. Only this machine's processes can be checked, so call
    it where no process on another machine writes into `directory` at the same moment (see docs/reliability.md)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = TMP_SUFFIX.search(name)
        if not m or not name.startswith(prefix) or (m.group(1) is not None and pid_alive(int(m.group(1)))):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass  # gone already (a concurrent cleanup), or not ours to delete
    if removed:
        logger.warning(f"removed {len(removed)} temp file(s) left by a killed process in {directory}: "
                       f"{', '.join(os.path.basename(p) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
    return removed


class DownloadError(UserError, RuntimeError):
    """A download that failed for good. `permanent`: retrying cannot help (HTTP 404, checksum mismatch)."""

    def __init__(self, message, url, reason, attempts, permanent=False):
        super().__init__(message)
        self.url, self.reason, self.attempts, self.permanent = url, reason, attempts, permanent


class ChecksumError(DownloadError, ValueError):
    """The downloaded bytes are not the expected ones (sha256 mismatch): never installed, never retried."""


def download_file(url, path, retries=5, backoff=2.0, timeout=30, expected_sha256=None, validate=None, name=None,
                  chunk_bytes=1 << 20):
    """Download `url` to `path`: streamed to `{path}.tmp.{pid}`, checked, then renamed into place, so `path` is
    complete or absent. Checks: the Content-Length (a cut transfer), `expected_sha256` (a mismatch is permanent:
    the file is not the expected one), and `validate(tmp_path)` (e.g. a parquet footer check; any exception means
    a broken download). Retries network errors, HTTP 5xx/408/429 and failed checks, waiting backoff, 2*backoff,
    4*backoff, ... seconds; other HTTP 4xx (e.g. 404) are not retried. Raises DownloadError (ChecksumError)."""
    import requests  # here, so that importing common stays light

    name = name or os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_orphan_tmp_files(directory, prefix=os.path.basename(path) + ".tmp")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        for attempt in range(1, retries + 1):
            try:
                _fetch(requests, url, tmp, timeout, chunk_bytes, expected_sha256)
                if validate is not None:
                    try:
                        validate(tmp)
                    except Exception as e:  # the callback decides what is broken; any failure means retry
                        raise _Retryable(f"invalid download: {one_line(e)}") from e
                os.replace(tmp, path)
                return path
            except _Permanent as e:
                cls = ChecksumError if e.checksum else DownloadError
                raise cls(f"could not download {url}: {e}", url, str(e), attempt, permanent=True) from None
            except (_Retryable, requests.RequestException, OSError) as e:
                reason = one_line(e)
                if attempt == retries:
                    raise DownloadError(f"could not download {url} after {retries} attempts ({reason})", url,
                                        reason, attempt) from None
                wait = backoff * 2 ** (attempt - 1)
                print0(f"Attempt {attempt}/{retries} for {name} failed ({reason}); retrying in {wait:.1f}s")
                time.sleep(wait)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    def __init__(self, message, checksum=False):
        super().__init__(message)
        self.checksum = checksum


def _fetch(requests, url, tmp, timeout, chunk_bytes, expected_sha256):
    digest, written = hashlib.sha256(), 0
    with requests.get(url, stream=True, timeout=(10, timeout)) as r:
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):  # timeout and rate limit: retried
            raise _Permanent(f"HTTP {r.status_code} (not retried)")
        r.raise_for_status()
        with open(tmp, "wb") as f:  # "wb": whatever an earlier attempt left is overwritten
            for chunk in r.iter_content(chunk_size=chunk_bytes):
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
        expected = r.headers.get("Content-Length")
        # requests decodes gzip/deflate on the fly: the length only counts for undecoded bodies
        if expected is not None and r.headers.get("Content-Encoding", "identity") == "identity":
            if written != int(expected):
                raise _Retryable(f"truncated download: got {written} of {expected} bytes")
    if expected_sha256 and digest.hexdigest() != expected_sha256.lower():
        raise _Permanent(f"sha256 {digest.hexdigest()} does not match the expected {expected_sha256}; "
                         f"the file was not installed", checksum=True)


def one_line(e):
    """An exception as one short line (some libraries put whole paragraphs in their messages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
        with open(cpu_peak_path()) as f:
            peaks = json.load(f)
        return peaks if isinstance(peaks, dict) else {}
    except (OSError, ValueError):
        return {}


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
    """argparse with the conventions above; argv defaults to sys.argv[1:]. A bad flag is one line on stderr and
    exit status 2, before any work."""

    def error(message):
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    parser.error = error
    for group in parser._action_groups:  # argument groups keep their own reference to error()
        group.error = error
    return parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))


# Flag types: argparse refuses a bad value at parse time, naming the flag and what it accepts


def _number(cast, check, what):
    def parse(value):
        try:
            v = cast(value)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v) or not check(v):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return v

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
auto_or_positive_int = _number(int, lambda v: v == -1 or v >= 1, "-1 (auto) or an integer >= 1")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
auto_or_non_negative_float = _number(float, lambda v: v == -1 or v >= 0, "-1 (auto) or a finite number >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
count = _number(lambda s: int(float(s)), lambda v: v >= 1, "a positive number (2e9 is fine)")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


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


def run_cli(main):
    """Entry point of a script: run main(), turning UserError into a one-line message and exit status 1."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
