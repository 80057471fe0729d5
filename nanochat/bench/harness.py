"""
What the benchmarks share: timed rounds that alternate ours and the peer (median of n), the ours/peer comparison,
the table printer, the JSON results and the run's environment, and the models compared (ours at a depth, its
transformers twin).
"""

import contextlib
import io
import json
import os
import statistics
import time

import torch

from nanochat.dist import resolve_device_type, synchronize
from nanochat.log import print0
from nanochat.models import build_model, config_from_depth


def alternate(fns, n):
    """{name: {figure: median}} of n rounds in which every fn runs once in turn, after one warm-up call each.
    A fn returns a dict of figures (e.g. {"s": seconds})."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def timer(fn, device_type, then=None):
    """fn as a dict of figures: {"s": seconds it took}. With `then`: fn, then `then`, and "then_s": then's part."""

    def timed():
        synchronize(device_type)
        t0 = time.perf_counter()
        fn()
        synchronize(device_type)
        t1 = time.perf_counter()
        if then is None:
            return {"s": t1 - t0}
        then()
        synchronize(device_type)
        t2 = time.perf_counter()
        return {"s": t2 - t0, "then_s": t2 - t1}

    return timed


def compare(ours, peer):
    """The JSON of ours beside the peer: ratio = ours / peer for every figure both have (None without a peer)."""
    if peer is None:
        return {"ours": ours, "peer": None, "ratio": None}
    ratio = {k: ours[k] / peer[k] for k in ours if isinstance(peer.get(k), (int, float)) and peer[k]}
    return {"ours": ours, "peer": peer, "ratio": ratio}


def print_table(header, rows):
    table = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print0("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print0("  ".join("-" * w for w in widths))


def fmt(x, spec=",.1f"):
    return "-" if x is None else format(x, spec)


def write_results(args, name, results):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print0(f"\nwrote {path}")
    return path


def setup(args):
    """Threads and device of a run; returns the device type."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device_type(args.device_type or None)


def environment(args, device_type):
    env = {"device": device_type, "threads": torch.get_num_threads(), "n": args.n, "torch": torch.__version__}
    if device_type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def quiet(fn, *args, **kwargs):
    """fn's result without its prints (setup_optimizers announces its LR scaling)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def make_model(model_type, args, seq_len, device_type):
    torch.manual_seed(0)
    config = config_from_depth(model_type, args.depth, seq_len, args.vocab_size, head_dim=args.head_dim)
    return build_model(model_type, config, device=device_type)


def twin(model):
    """The transformers model with our weights (fp32), or (None, why not)."""
    try:
        from nanochat.hf import to_hf
        return to_hf(model).to(model.get_device()), ""
    except Exception as e:  # no transformers, no mapping for this type, or a config without an exact equivalent
        return None, f"{type(e).__name__}: {e}"
