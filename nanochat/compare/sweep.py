"""
Each arm at its own best learning rate (scripts/compare.py --lr_sweep): seed 1 of every arm is trained at each
multiplier, the multiplier with the lowest validation bpb is kept for the arm's seeds, and a best value at the edge
of the sweep is flagged (the optimum may lie beyond it), never silently used as if it were bracketed.
"""

import os

from nanochat.checkpoint import checkpoint_dir, list_steps
from nanochat.compare.runs import Planned, last_metrics
from nanochat.report import read_metrics_jsonl


def val_bpb(tag):
    """A run's validation bpb: scripts.base_loss's (more tokens) when it ran, else the last in-training one."""
    metrics = last_metrics("base", tag)
    if "train_bpb" in metrics and metrics.get("val_bpb") is not None:
        return metrics["val_bpb"]
    if not list_steps(checkpoint_dir("base", tag)):
        return None
    _, val = read_metrics_jsonl(checkpoint_dir("base", tag))
    return val[-1]["val_bpb"] if val else None


def sweep_runs(arms, multipliers):
    return [Planned(arm, 1, m) for arm in arms for m in multipliers]


def sweep_results(arms, multipliers):
    """{arm stem: {multiplier: val bpb of its seed-1 run, None when missing}}."""
    return {arm.stem: {m: val_bpb(Planned(arm, 1, m).tag) for m in multipliers} for arm in arms}


def best_multiplier(results):
    """(the multiplier with the lowest bpb, whether it is at the edge of the sweep); (1.0, False) with no result."""
    measured = {m: v for m, v in results.items() if v is not None}
    if not measured:
        return 1.0, False
    best = min(measured, key=measured.get)
    return best, len(results) > 1 and best in (min(results), max(results))


def markdown(arms, results, what):
    """The sweep as a table (an arm per row, a multiplier per column) and the multiplier each arm got."""
    multipliers = sorted({m for r in results.values() for m in r})
    lines = ["## Learning rate: each arm at its own best\n", f"Seed 1 of every arm at each multiplier of {what}; the "
             "lowest validation bpb (bold) is kept for the arm's seeds.\n",
             "| arm | " + " | ".join(f"x{m:g}" for m in multipliers) + " | best |",
             "|---" * (len(multipliers) + 2) + "|"]
    for arm in arms:
        r = results[arm.stem]
        best, edge = best_multiplier(r)
        cells = [("-" if r.get(m) is None else f"**{r[m]:.4f}**" if m == best else f"{r[m]:.4f}") for m in multipliers]
        lines.append(f"| {arm.label} | " + " | ".join(cells) + f" | x{best:g}{' (at the edge)' if edge else ''} |")
    edges = [arm.label for arm in arms if best_multiplier(results[arm.stem])[1]]
    if edges:
        lines.append(f"\n**At the edge of the sweep** ({', '.join(edges)}): the best multiplier may lie beyond the "
                     f"range tried; widen --lr_sweep before reading these arms' results as tuned.")
    return "\n".join(lines) + "\n"


def plot(arms, results, path):
    """Validation bpb against the multiplier (log axis), a line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        points = sorted((m, v) for m, v in results[arm.stem].items() if v is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=arm.label)
            best, _ = best_multiplier(results[arm.stem])
            ax.scatter([best], [results[arm.stem][best]], s=120, facecolors="none", edgecolors="k", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set(title="validation bpb against the learning-rate multiplier (seed 1; circle: best)",
           xlabel="learning-rate multiplier", ylabel="bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)
