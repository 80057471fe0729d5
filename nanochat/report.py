"""
The run report, as nanochat's: every stage appends its section to $NANOCHAT_BASE_DIR/report/<section>.md when it
ends, and `generate` assembles them, behind a header (environment, git commit, hardware, torch, on GPU an estimated
cost), into report.md with a summary table.
    python -m nanochat.report reset      # start a new report (writes the header, clears the sections)
    python -m nanochat.report generate   # assemble report.md
In a script: get_report().log(section="Base model training", data=[vars(args), results]). Only rank 0 writes;
NANOCHAT_REPORT=0 turns it off (scripts.compare does, its runs have a report of their own).
Also here: the metrics.jsonl helpers that the training loops write and the reports read.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys

from nanochat.fileio import open_regular
from nanochat.log import print0
from nanochat.mfu import cpu_name

# -----------------------------------------------------------------------------
# metrics.jsonl: one JSON line per training step or evaluation, in every checkpoint directory


def append_metrics(path, record):
    """One JSON line per record: training steps and evaluations, read back by the report and the plots."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, from_step):
    """On resume, drop records of steps that will be recomputed, so the file reads as one run."""
    if not os.path.exists(path):
        return
    kept = []
    with open_regular(path, "r") as f:
        for line in f:
            try:
                if json.loads(line)["step"] < from_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a killed process
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics_jsonl(ckpt_dir):
    """(training step records, validation records) of a checkpoint directory."""
    path = os.path.join(ckpt_dir, "metrics.jsonl")
    train, val = [], []
    if os.path.exists(path):
        with open_regular(path, "r") as f:
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


# -----------------------------------------------------------------------------
# The run report

# Sections in pipeline order: (title, metrics of its entries that go into the summary table)
SECTIONS = {
    "Tokenizer training": (),
    "Tokenizer evaluation": (),
    "Base model training": ("val_bpb", "train_loss", "core"),
    "Base model loss": ("train_bpb", "val_bpb"),
    "Base model evaluation": ("CORE",),
    "Chat evaluation base": ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"),
    "Midtraining": ("val_loss",),
    "Chat evaluation mid": ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"),
    "Chat SFT": ("val_loss",),
    "Chat evaluation sft": ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"),
    "Chat RL": ("pass@1",),
    "Chat evaluation rl": ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"),
}
# Rough on-demand prices in USD per GPU-hour (2025 cloud list prices), for the cost estimate only
GPU_HOURLY_USD = {"H200": 3.50, "H100": 3.00, "A100": 1.80, "L40S": 1.00, "A10": 0.75, "L4": 0.70, "V100": 0.55}
DEFAULT_GPU_HOURLY_USD = 2.00
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def run_command(cmd):
    """A command's stdout, or None when it fails (no git, not a repository)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpus():
    """[(name, memory GiB)] of the visible CUDA devices."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(p.name, p.total_memory / 2**30) for p in map(torch.cuda.get_device_properties,
                                                          range(torch.cuda.device_count()))]


def gpu_hourly_rate(devices):
    """Estimated USD per hour of the visible GPUs together; None without GPUs."""
    if not devices:
        return None
    rates = [next((r for key, r in GPU_HOURLY_USD.items() if key in name.upper()), DEFAULT_GPU_HOURLY_USD)
             for name, _ in devices]
    return sum(rates)


def header():
    """Environment, git commit, hardware and software of this run."""
    import torch

    commit = run_command(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = run_command(["git", "status", "--porcelain", "--untracked-files=no"])
    message = (run_command(["git", "log", "-1", "--pretty=%s"]) or "")[:80]
    branch = run_command(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    devices = gpus()
    mem = memory_gib()
    lines = ["# nanochat run report", "", f"Run started: {datetime.datetime.now().strftime(TIME_FORMAT)}", "",
             "## Environment", "",
             f"- Git: {branch} {commit}{' (dirty)' if dirty else ''} {message}".rstrip(),
             f"- Platform: {platform.system()} {platform.release()} ({platform.machine()})",
             f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores" + (f", {mem:.1f} GiB memory" if mem else "")]
    if devices:
        names = sorted({name for name, _ in devices})
        lines += [f"- GPUs: {len(devices)}x {', '.join(names)}, {sum(m for _, m in devices):.0f} GiB in total",
                  f"- Estimated cost: ${gpu_hourly_rate(devices):.2f}/hour (list prices, see nanochat/report.py)"]
    else:
        lines.append("- GPUs: none")
    lines += [f"- Python {platform.python_version()}, torch {torch.__version__}"
              + (f", CUDA {torch.version.cuda}" if devices else ""),
              f"- NANOCHAT_BASE_DIR: {os.environ.get('NANOCHAT_BASE_DIR', '~/.cache/nanochat')}", ""]
    return "\n".join(lines) + "\n"


def render(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def timestamp_of(line):
    try:
        return datetime.datetime.strptime(line.split(":", 1)[1].strip(), TIME_FORMAT)
    except (IndexError, ValueError):
        return None


class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir

    def path(self, name):
        return os.path.join(self.report_dir, name)

    def log(self, section, data):
        """Append an entry to the section: strings as they are, dicts as '- key: value' lines (None values and keys
        already written in this entry skipped). Entries accumulate (two model types trained in one run both appear)
        until `reset`."""
        os.makedirs(self.report_dir, exist_ok=True)
        path = self.path(f"{slugify(section)}.md")
        lines = [] if os.path.exists(path) else [f"## {section}", ""]
        lines.append(f"timestamp: {datetime.datetime.now().strftime(TIME_FORMAT)}")
        lines.append("")
        written = set()
        for item in data:
            if isinstance(item, str):
                lines.append(item.rstrip("\n"))
                continue
            for k, v in (item or {}).items():
                if v is not None and k not in written:
                    lines.append(f"- {k}: {render(v)}")
                    written.add(k)
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def reset(self):
        """A new report: the section files and report.md are removed, the header records the start time."""
        os.makedirs(self.report_dir, exist_ok=True)
        for name in [f"{slugify(s)}.md" for s in SECTIONS] + ["report.md"]:
            if os.path.exists(self.path(name)):
                os.remove(self.path(name))
        with open(self.path("header.md"), "w") as f:
            f.write(header())
        print0(f"New report: header written to {self.path('header.md')}")

    def generate(self):
        """report.md: the header, every section in pipeline order, a summary table and the wall-clock time."""
        if not os.path.exists(self.path("header.md")):
            print0(f"no {self.path('header.md')}: writing one now (run `python -m nanochat.report reset` before "
                  f"the first stage to record the start time and cost)")
            os.makedirs(self.report_dir, exist_ok=True)
            with open(self.path("header.md"), "w") as f:
                f.write(header())
        with open_regular(self.path("header.md"), "r") as f:
            text = f.read()
        start = next((timestamp_of(line) for line in text.splitlines() if line.startswith("Run started:")), None)
        end, summary = None, []
        for section, keys in SECTIONS.items():
            path = self.path(f"{slugify(section)}.md")
            if not os.path.exists(path):
                continue
            with open_regular(path, "r") as f:
                body = f.read()
            text += "\n" + body
            tag = None
            for line in body.splitlines():
                if line.startswith("timestamp:"):
                    end = timestamp_of(line) or end
                m = re.match(r"- (\S[^:]*): (.+)$", line)
                if m and m.group(1) == "model_tag":
                    tag = m.group(2)
                elif m and m.group(1).split("/")[-1] in keys:
                    summary.append((section, tag or "-", m.group(1).split("/")[-1], m.group(2)))
        text += "\n## Summary\n\n"
        if summary:
            text += "| stage | model | metric | value |\n|---|---|---|---|\n"
            text += "".join(f"| {s} | {t} | {k} | {v} |\n" for s, t, k, v in summary)
        if start and end:
            hours = (end - start).total_seconds() / 3600
            text += f"\nTotal wall-clock time: {int(hours)}h{int(hours * 60) % 60:02d}m\n"
            rate = gpu_hourly_rate(gpus())
            if rate:
                text += f"Estimated cost: ${rate * hours:.2f} at ${rate:.2f}/hour\n"
        with open(self.path("report.md"), "w") as f:
            f.write(text)
        print0(f"Report: {self.path('report.md')}")
        return self.path("report.md")


class DummyReport:
    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    """The report of $NANOCHAT_BASE_DIR on rank 0; a no-op elsewhere and when NANOCHAT_REPORT=0."""
    from nanochat.fileio import get_base_dir

    if int(os.environ.get("RANK", 0)) != 0 or os.environ.get("NANOCHAT_REPORT", "1") == "0":
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "generate"
    if command not in ("generate", "reset"):
        sys.exit(f"usage: python -m nanochat.report [generate|reset] (got {command!r})")
    from nanochat.fileio import get_base_dir

    report = Report(os.path.join(get_base_dir(), "report"))
    report.generate() if command == "generate" else report.reset()
