"""
Loss against compute, per architecture (scripts/compare.py with three or more depths): a power law with an offset,
L(C) = a * (C / C0)^(-b) + c, fitted by least squares (scipy's curve_fit) to every run's (training FLOPs, val bpb),
with the parameters' standard errors from the covariance of the fit, and where two fitted curves cross.
C0 (the smallest C) keeps a of the order of the losses, so the fit is well conditioned.
"""

import math
import os
from dataclasses import dataclass

import numpy as np


@dataclass
class PowerLaw:
    a: float
    b: float
    c: float
    se: tuple  # standard errors of a, b, c
    c0: float  # the unit of C
    cmin: float  # the fitted range of C
    cmax: float
    n: int  # points

    def __call__(self, flops):
        return self.a * (np.asarray(flops, dtype=float) / self.c0) ** -self.b + self.c


def fit_power_law(flops, losses):
    """The PowerLaw through the points, or None with fewer than 4 points (3 parameters need a residual to have an
    uncertainty) or when least squares does not converge."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(flops, dtype=float), np.asarray(losses, dtype=float)
    if len(x) < 4 or len(set(x)) < 3:
        return None
    c0 = float(x.min())

    def law(c, a, b, offset):
        return a * (c / c0) ** -b + offset

    p0 = (max(y.max() - y.min(), 1e-3), 0.3, max(y.min() - 0.1 * (y.max() - y.min()), 0.0))
    try:
        params, cov = curve_fit(law, x, y, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    se = tuple(float(math.sqrt(v)) if np.isfinite(v) and v >= 0 else float("nan") for v in np.diag(cov))
    return PowerLaw(*map(float, params), se, c0, float(x.min()), float(x.max()), len(x))


def crossing(first, second, lo, hi, points=2000):
    """The smallest C in [lo, hi] (on a log grid) where the two fitted curves cross, or None."""
    grid = np.geomspace(lo, hi, points)
    diff = first(grid) - second(grid)
    changes = np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]
    if not len(changes):
        return None
    i = changes[0]  # linear interpolation of the difference between the two grid points
    return float(grid[i] + (grid[i + 1] - grid[i]) * diff[i] / (diff[i] - diff[i + 1]))


def describe_crossing(fits):
    """One sentence on where the first two fitted curves cross: inside the fitted range, only beyond it (said to be
    an extrapolation), or not at all within 100x of it."""
    (name_a, a), (name_b, b) = list(fits.items())[:2]
    lo, hi = max(a.cmin, b.cmin), min(a.cmax, b.cmax)
    inside = crossing(a, b, lo, hi)
    if inside is not None:
        return f"The fitted curves of {name_a} and {name_b} cross at {inside:.3g} FLOPs, inside the fitted range."
    beyond = crossing(a, b, hi, hi * 100)
    better = name_a if a(hi) < b(hi) else name_b
    if beyond is not None:
        return (f"The fitted curves do not cross within the fitted range ({lo:.3g}-{hi:.3g} FLOPs), where {better} is "
                f"lower; extrapolated, they would cross at {beyond:.3g} FLOPs ({beyond / hi:.1f}x beyond the largest "
                f"run): an extrapolation the data do not support.")
    return (f"The fitted curves do not cross within the fitted range ({lo:.3g}-{hi:.3g} FLOPs), where {better} is "
            f"lower, nor within 100x beyond it (extrapolated).")


def points(runs):
    """(training FLOPs, val bpb) of each run: FLOPs per token (estimate_flops) x the tokens it trained on."""
    from nanochat.compare import report
    from nanochat.compare.sweep import val_bpb

    out = []
    for run in runs:
        bpb, tokens = val_bpb(run.tag), report.tokens_per_step(run)
        if bpb is not None and tokens:
            out.append((report.shape(run)["flops"] * tokens * run.meta["step"], bpb))
    return out


def section(runs_by_type, path):
    """The fit of each type's runs (every depth, every seed) as markdown, and its plot; None with too few points."""
    data = {t: points(runs) for t, runs in runs_by_type.items()}
    fits = {t: fit_power_law(*zip(*p)) if len(p) >= 4 else None for t, p in data.items()}
    if sum(f is not None for f in fits.values()) < 1:
        return None
    lines = ["## Across depths: val bpb against training compute\n",
             "L(C) = a (C / C0)^-b + c fitted by least squares to every run (each depth, each seed); ± is the "
             "standard error from the fit's covariance. C is estimate_flops() x training tokens.\n",
             "| type | runs | a | b (exponent) | c (offset) | fitted range (FLOPs) |", "|---|---|---|---|---|---|"]
    for t, f in fits.items():
        if f is None:
            lines.append(f"| {t} | {len(data[t])} | - | - | - | too few points to fit |")
            continue
        lines.append(f"| {t} | {f.n} | {f.a:.3f} ± {f.se[0]:.3f} | {f.b:.3f} ± {f.se[1]:.3f} | {f.c:.3f} ± "
                     f"{f.se[2]:.3f} | {f.cmin:.3g} - {f.cmax:.3g} |")
    fitted = {t: f for t, f in fits.items() if f is not None}
    if len(fitted) >= 2:
        lines.append("\n" + describe_crossing(fitted))
    plot(data, fitted, path)
    return "\n".join(lines) + "\n", os.path.basename(path)


def plot(data, fits, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (t, p) in enumerate(data.items()):
        if not p:
            continue
        x, y = zip(*p)
        ax.scatter(x, y, color=f"C{i}", s=18, label=f"{t} runs")
        if t in fits:
            grid = np.geomspace(min(x), max(x), 100)
            ax.plot(grid, fits[t](grid), color=f"C{i}", label=f"{t}: {fits[t].a:.2f} (C/C0)^-{fits[t].b:.2f} + "
                                                                f"{fits[t].c:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(title="validation bpb against training FLOPs (log-log)", xlabel="training FLOPs", ylabel="bits per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
