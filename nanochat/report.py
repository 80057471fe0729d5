"""
Run report: a markdown table and PNG plots comparing checkpoints side by side (e.g. gpt_d4 vs alcoholic_d4),
built from what training and evaluation already wrote: metrics.jsonl and the meta files' metrics.
"""

import json
import os

from nanochat.checkpoint import checkpoint_dir, find_last_step, read_meta
from nanochat.common import get_base_dir


def append_metrics(path, record):
    """One JSON line per record: training steps and evaluations, read back by the report and the plots."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, from_step):
    """On resume, drop records of steps that will be recomputed, so the file reads as one run."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < from_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a killed process
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics_jsonl(ckpt_dir):
    path = os.path.join(ckpt_dir, "metrics.jsonl")
    train, val = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed process
                if "loss" in r:
                    train.append(r)
                if "val_bpb" in r:
                    val.append(r)
    return train, val


def collect(source, tags):
    runs = []
    for tag in tags:
        d = checkpoint_dir(source, tag)
        step = find_last_step(d)
        meta = read_meta(d, step)
        train, val = read_metrics_jsonl(d)
        runs.append({"tag": tag, "dir": d, "step": step, "meta": meta, "train": train, "val": val})
    return runs


def ema(values, beta=0.9):
    out, s = [], None
    for v in values:
        s = v if s is None else beta * s + (1 - beta) * v
        out.append(s)
    return out


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run["train"]:
            ax1.plot([r["step"] for r in run["train"]], ema([r["loss"] for r in run["train"]]), label=run["tag"])
        if run["val"]:
            ax2.plot([r["step"] for r in run["val"]], [r["val_bpb"] for r in run["val"]], marker="o", label=run["tag"])
    ax1.set(title="training loss (EMA 0.9)", xlabel="step", ylabel="loss (nats/token)")
    ax2.set(title="validation bits per byte", xlabel="step", ylabel="bpb")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(runs, png_name):
    rows = [("model type", lambda r: r["meta"]["model_type"]),
            ("step", lambda r: r["step"]),
            ("layers / width", lambda r: f"{r['meta']['model_config']['n_layer']} / "
                                         f"{r['meta']['model_config']['n_embd']}"),
            ("final train loss", lambda r: r["train"][-1]["loss"] if r["train"] else None),
            ("final val bpb", lambda r: r["val"][-1]["val_bpb"] if r["val"] else None),
            ("median tok/s", lambda r: int(sorted(x["tok_per_sec"] for x in r["train"])[len(r["train"]) // 2])
             if r["train"] else None)]
    extra = sorted({k for r in runs for k, v in r["meta"].get("metrics", {}).items()
                    if isinstance(v, (int, float)) and k not in ("val_bpb", "train_loss")})
    rows += [(k, lambda r, k=k: r["meta"].get("metrics", {}).get(k)) for k in extra]
    lines = ["| | " + " | ".join(r["tag"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fmt(get(r)) for r in runs) + " |" for name, get in rows]
    return "# Model comparison\n\n" + "\n".join(lines) + f"\n\n![curves]({png_name})\n"


def write_report(source, tags, out_dir=None):
    out_dir = out_dir or os.path.join(get_base_dir(), "report")
    os.makedirs(out_dir, exist_ok=True)
    runs = collect(source, tags)
    png = os.path.join(out_dir, "compare.png")
    plot(runs, png)
    md_path = os.path.join(out_dir, "compare.md")
    text = markdown(runs, os.path.basename(png))
    with open(md_path, "w") as f:
        f.write(text)
    return md_path, png, text
