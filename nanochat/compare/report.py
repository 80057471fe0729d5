"""
The side-by-side report of scripts.compare: runs grouped into arms (one model type at one depth, several seeds),
each metric as mean ± std over the seeds, a stated test of which differences exceed the seed spread (Welch's t-test),
and the plots (validation bpb against steps, tokens and FLOPs, training loss, throughput). Everything is read from
what training and evaluation already wrote: metrics.jsonl and the meta files' metrics.
"""

import math
import os
import statistics
from dataclasses import dataclass, field

from nanochat.checkpoint import SOURCE_DIRS, checkpoint_dir, find_last_step, list_steps, read_meta
from nanochat.models import config_from_dict
from nanochat.plan import describe
from nanochat.report import read_metrics_jsonl

# A difference between two arms "exceeds the seed spread" when Welch's t-test (unequal variances, Welch-Satterthwaite
# degrees of freedom) rejects equal means at this two-sided level. With 3 seeds per arm that takes |t| of about 3-4:
# what passes is unlikely to be seed noise, what does not may still be real and deserve more seeds.
SIGNIFICANCE = 0.05


@dataclass
class Run:
    tag: str
    meta: dict
    train: list  # metrics.jsonl records of training steps
    val: list  # metrics.jsonl records with val_bpb
    chat: dict = field(default_factory=dict)  # "sft ChatCORE" -> value, from the chat stages' meta files


@dataclass
class Arm:
    label: str
    runs: list


def collect(source, tags):
    """Run records of checkpoints `tags` under `source`, with the chat_eval scores of every stage of the same tag."""
    runs = []
    for tag in tags:
        d = checkpoint_dir(source, tag)
        meta = read_meta(d, find_last_step(d))
        train, val = read_metrics_jsonl(d)
        runs.append(Run(tag, meta, train, val, chat_scores(tag)))
    return runs


def chat_scores(tag):
    """chat_eval results (and the held-out conversation loss of mid/SFT) recorded in the last checkpoint of `tag` at
    every stage: {"sft ARC-Easy": 0.31, "sft held-out loss": 0.87, ...}."""
    scores = {}
    for stage in SOURCE_DIRS:
        d = checkpoint_dir(stage, tag)
        steps = list_steps(d)
        if not steps:
            continue
        metrics = read_meta(d, steps[-1]).get("metrics", {})
        if stage != "base" and isinstance(metrics.get("val_loss"), (int, float)):
            scores[f"{stage} held-out loss"] = metrics["val_loss"]
        for key, value in metrics.items():
            if key.startswith("chat_eval/") and not key.endswith("/max_problems") and isinstance(value, (int, float)):
                scores[f"{stage} {key.split('/', 1)[1]}"] = value
    return scores


# -----------------------------------------------------------------------------
# Per-run quantities


def shape(run):
    """Params by group and FLOPs/token of the run's architecture (a meta-device model: nothing is allocated)."""
    return describe(run.meta["model_type"], config_from_dict(run.meta["model_type"], run.meta["model_config"]))


def tokens_per_step(run):
    return round(run.train[-1]["tok_per_sec"] * run.train[-1]["dt"]) if run.train else None


def median_tok_per_sec(run):
    rates = [r["tok_per_sec"] for r in run.train[1:]]  # the first step includes warm-up (and compilation)
    return statistics.median(rates) if rates else None


def final_val_bpb(run):
    return run.val[-1]["val_bpb"] if run.val else None


# name, how to read it from a run, format, unit note
METRICS = [
    ("final train loss (EMA 0.9)", lambda r: r.meta.get("metrics", {}).get("train_loss"), "{:.4f}"),
    ("val bpb (end of training)", final_val_bpb, "{:.4f}"),
    ("val bpb (base_loss)", lambda r: r.meta.get("metrics", {}).get("val_bpb")
     if "train_bpb" in r.meta.get("metrics", {}) else None, "{:.4f}"),
    ("train bpb (base_loss)", lambda r: r.meta.get("metrics", {}).get("train_bpb"), "{:.4f}"),
    ("CORE", lambda r: r.meta.get("metrics", {}).get("core"), "{:.4f}"),
    ("tokens/s (median step)", median_tok_per_sec, "{:,.0f}"),
    ("peak memory (MiB)", lambda r: r.meta.get("metrics", {}).get("peak_memory_bytes") and
     r.meta["metrics"]["peak_memory_bytes"] / 2**20, "{:,.0f}"),
]


def metrics_of(arm):
    """[(name, [value per run], format)], chat scores included; a metric no run has is left out."""
    rows = [(name, [get(r) for r in arm.runs], f) for name, get, f in METRICS]
    chat_names = sorted({k for r in arm.runs for k in r.chat})
    rows += [(name, [r.chat.get(name) for r in arm.runs], "{:.4f}") for name in chat_names]
    return rows


# -----------------------------------------------------------------------------
# Statistics over seeds


def mean_std(values):
    """(mean, sample std, n) of the values that exist; std is None with fewer than 2."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def welch(a, b):
    """(difference of means b - a, its standard error, t, two-sided p) of two samples: Welch's t-test (scipy). se,
    t and p are None when either sample has fewer than 2 values; t and p are None when the standard error is 0 (a
    deterministic quantity)."""
    from scipy import stats

    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if ma is None or mb is None:
        return None, None, None, None
    if sa is None or sb is None:
        return mb - ma, None, None, None
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    if se == 0:
        return mb - ma, se, None, None
    test = stats.ttest_ind([v for v in b if v is not None], [v for v in a if v is not None], equal_var=False)
    return mb - ma, se, float(test.statistic), float(test.pvalue)


def fmt_stat(values, f):
    m, s, n = mean_std(values)
    if m is None:
        return "-"
    if s is None:
        return f.format(m)
    return f"{f.format(m)} ± {f.format(s)}"


def verdicts(reference, other):
    """One sentence per metric: the difference between two arms and whether it exceeds the seed spread."""
    ref_rows = {name: values for name, values, _ in metrics_of(reference)}
    out = []
    for name, values, f in metrics_of(other):
        if name not in ref_rows:
            continue
        diff, se, t, p = welch(ref_rows[name], values)
        if diff is None:
            continue
        delta = f"{'+' if diff >= 0 else '-'}{f.format(abs(diff))}"
        if se is None:
            out.append(f"{name}: {delta} (one run per arm: no seed spread to compare with)")
        elif t is None:
            out.append(f"{name}: {delta} (no spread at all: identical in every seed)")
        elif p < SIGNIFICANCE:
            out.append(f"**{name}: {delta}, t = {t:.1f}, p = {p:.2g}: exceeds the seed spread**")
        else:
            out.append(f"{name}: {delta}, t = {t:.1f}, p = {p:.2g}: within the seed spread")
    return out


# -----------------------------------------------------------------------------
# Plots


def series_mean(runs, records, key):
    """(steps, mean, min, max) of `key` over the runs, at the steps every run has."""
    per_run = [{r["step"]: r[key] for r in records(run)} for run in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    rows = [[d[s] for d in per_run] for s in steps]
    return steps, [statistics.fmean(v) for v in rows], [min(v) for v in rows], [max(v) for v in rows]


def ema(values, beta=0.9):
    out, s = [], None
    for v in values:
        s = v if s is None else beta * s + (1 - beta) * v
        out.append(s)
    return out


def smoothed_train(run):
    losses = ema([r["loss"] for r in run.train])
    return [{"step": r["step"], "loss": loss} for r, loss in zip(run.train, losses)]


LINE_STYLES = ["-", "--", ":", "-."]


def arm_style(arms):
    """A colour per model type and a line style per depth, so 'alcoholic d6' reads as alcoholic at a glance; arms
    that share type and depth (tabulated checkpoints) get a colour each."""
    keys = [(a.runs[0].meta["model_type"], a.runs[0].meta["model_config"]["n_layer"]) for a in arms]
    if len(set(keys)) < len(keys):
        return {a.label: dict(color=f"C{i}", linestyle="-") for i, a in enumerate(arms)}
    types, depths = list(dict.fromkeys(t for t, _ in keys)), list(dict.fromkeys(d for _, d in keys))
    return {a.label: dict(color=f"C{types.index(t)}", linestyle=LINE_STYLES[depths.index(d) % len(LINE_STYLES)])
            for a, (t, d) in zip(arms, keys)}


def plot_curves(arms, style, ax_step, ax_tok, ax_flop, ax_loss):
    """Validation bpb against steps, tokens and FLOPs, and the training loss: the mean over seeds, a min-max band."""
    bpb_seen, loss_seen = [], []  # values past the first steps: the y-range, so the initial drop does not flatten
    for arm in arms:
        st, n = style[arm.label], len(arm.runs)
        label = f"{arm.label} ({n} seeds)" if n > 1 else arm.label
        tps, fpt = tokens_per_step(arm.runs[0]) or 0, shape(arm.runs[0])["flops"]
        steps, mean, lo, hi = series_mean(arm.runs, lambda r: r.val, "val_bpb")
        for ax, scale in ((ax_step, 1), (ax_tok, tps), (ax_flop, tps * fpt)):
            x = [s * scale for s in steps]
            ax.plot(x, mean, marker="o", markersize=3, label=label, **st)
            if n > 1:
                ax.fill_between(x, lo, hi, color=st["color"], alpha=0.2, linewidth=0)
        bpb_seen += lo[1:] + hi[1:]
        steps, mean, lo, hi = series_mean(arm.runs, smoothed_train, "loss")
        loss_seen += lo[len(lo) // 10:] + hi[len(hi) // 10:]
        ax_loss.plot(steps, mean, label=label, **st)
        if n > 1:
            ax_loss.fill_between(steps, lo, hi, color=st["color"], alpha=0.2, linewidth=0)
    for axs, seen in (((ax_step, ax_tok, ax_flop), bpb_seen), ((ax_loss,), loss_seen)):
        if seen:
            pad = 0.05 * (max(seen) - min(seen) or 1)
            for ax in axs:
                ax.set_ylim(min(seen) - pad, max(seen) + pad)


def plot_per_arm(arms, style, ax_speed, ax_final):
    """Throughput and final validation bpb per arm: mean ± std, a dot per seed."""
    labels = [a.label for a in arms]
    for i, arm in enumerate(arms):
        color = style[arm.label]["color"]
        rates = [median_tok_per_sec(r) for r in arm.runs if r.train]
        m, s, _ = mean_std(rates)
        if m is not None:
            ax_speed.bar(i, m, yerr=s or 0, color=color, alpha=0.7, capsize=4)
            ax_speed.scatter([i] * len(rates), rates, color="k", s=10, zorder=3)
        finals = [final_val_bpb(r) for r in arm.runs if r.val]
        m, s, _ = mean_std(finals)
        if m is not None:
            ax_final.errorbar(i, m, yerr=s or 0, fmt="o", color=color, capsize=6, markersize=8)
            ax_final.scatter([i + 0.12] * len(finals), finals, color="k", s=10, zorder=3)
    for ax in (ax_speed, ax_final):
        ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)


def plot(arms, path):
    """Six panels: val bpb vs step, tokens and training FLOPs; training loss; tokens/s; final val bpb per seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_step, ax_tok, ax_flop), (ax_loss, ax_speed, ax_final) = axes
    style = arm_style(arms)
    plot_curves(arms, style, ax_step, ax_tok, ax_flop, ax_loss)
    plot_per_arm(arms, style, ax_speed, ax_final)
    ax_step.set(title="validation bpb (band: min-max over seeds)", xlabel="step", ylabel="bits per byte")
    ax_tok.set(title="validation bpb vs training tokens", xlabel="tokens", ylabel="bits per byte")
    ax_flop.set(title="validation bpb vs training FLOPs", xlabel="FLOPs (estimate_flops x tokens)",
                ylabel="bits per byte")
    ax_loss.set(title="training loss (EMA 0.9)", xlabel="step", ylabel="loss (nats/token)")
    ax_speed.set(title="throughput: median tokens/s per run (bar: mean ± std)", ylabel="tokens/s")
    ax_final.set(title="final validation bpb: mean ± std, dots = seeds", ylabel="bits per byte")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (ax_step, ax_tok, ax_flop, ax_loss):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Markdown


def fmt_count(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.3e}"


def summary_table(arms):
    """Shapes, parameter counts, budget and every metric, mean ± std over seeds, an arm per column."""
    shapes = [shape(a.runs[0]) for a in arms]
    lines = ["| | " + " | ".join(a.label for a in arms) + " |", "|---" * (len(arms) + 1) + "|",
             "| runs (seeds) | " + " | ".join(str(len(a.runs)) for a in arms) + " |",
             "| shape | " + " | ".join(s["shape"] for s in shapes) + " |"]
    for group in ("embedding", "lm_head", "norms", "matrices", "total"):
        lines.append(f"| params: {group} | " + " | ".join(fmt_count(s.get(group, 0)) for s in shapes) + " |")
    lines.append("| FLOPs/token | " + " | ".join(f"{s['flops']:.3e}" for s in shapes) + " |")
    lines.append("| steps x tokens/step | " + " | ".join(
        f"{a.runs[0].meta['step']:,} x {tokens_per_step(a.runs[0]) or 0:,}" for a in arms) + " |")
    names = list(dict.fromkeys(name for a in arms for name, _, _ in metrics_of(a)))
    for name in names:
        cells = []
        for a in arms:
            row = {n: (v, f) for n, v, f in metrics_of(a)}.get(name)
            cells.append(fmt_stat(*row) if row else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nmean ± sample std over seeds. val bpb (end of training) is the last in-training "
                               "evaluation (the first --eval_tokens of the validation split, the points of the "
                               "curves); val bpb (base_loss) is scripts.base_loss on more tokens of it.\n")


def verdict_section(arms, reference_of):
    lines = []
    for arm in arms:
        ref = reference_of(arm) if reference_of else None
        if ref is not None:
            lines.append(f"\n**{arm.label} vs {ref.label}** (difference = {arm.label} minus {ref.label}):\n")
            lines += [f"- {v}" for v in verdicts(ref, arm)]
    if not lines:
        return ""
    return (f"\n## Which differences exceed the seed spread\n\nCriterion: Welch's t-test (unequal variances) rejects "
            f"equal means at p < {SIGNIFICANCE:g}, two-sided; t = difference / sqrt(s_a²/n_a + s_b²/n_b). Differences "
            f"in bold pass it; the others are not distinguishable from the run-to-run noise of this many seeds.\n"
            + "\n".join(lines) + "\n")


def runs_section(arms):
    text = "\n## Runs\n\n| run | type | seed | steps | final train loss | val bpb | CORE | tokens/s | peak MiB |\n"
    text += "|---|---|---|---|---|---|---|---|---|\n"
    for a in arms:
        for r in a.runs:
            m = r.meta.get("metrics", {})
            cells = [r.tag, r.meta["model_type"], r.meta.get("train_args", {}).get("seed", "-"), r.meta["step"],
                     fmt_opt(m.get("train_loss"), "{:.4f}"), fmt_opt(final_val_bpb(r), "{:.4f}"),
                     fmt_opt(m.get("core"), "{:.4f}"), fmt_opt(median_tok_per_sec(r), "{:,.0f}"),
                     fmt_opt(m.get("peak_memory_bytes") and m["peak_memory_bytes"] / 2**20, "{:,.0f}")]
            text += "| " + " | ".join(str(c) for c in cells) + " |\n"
    return text


def markdown(arms, png_name, title="Model comparison", setup="", reference_of=None, sections=()):
    """The report: setup, the table (mean ± std over seeds), the verdicts, further sections (markdown, e.g. the
    learning-rate sweep and the fit across depths), the runs, the figure. reference_of(arm) -> the arm it is compared
    with (None: no verdicts for it)."""
    text = f"# {title}\n\n{setup}\n\n" if setup else f"# {title}\n\n"
    text += summary_table(arms) + verdict_section(arms, reference_of)
    text += "".join(f"\n{section}" for section in sections)
    return text + runs_section(arms) + f"\n![curves]({png_name})\n"


def fmt_opt(v, f):
    return "-" if v is None else f.format(v)


def write(arms, out_dir, **kwargs):
    """compare.md and compare.png in out_dir; returns (md path, png path, markdown text)."""
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "compare.png")
    plot(arms, png)
    md_path = os.path.join(out_dir, "compare.md")
    text = markdown(arms, os.path.basename(png), **kwargs)
    with open(md_path, "w") as f:
        f.write(text)
    return md_path, png, text
