"""
The metrics.jsonl helpers: the training loops write one JSON line per step or evaluation, the reports
(nanochat.compare) read them back.
"""

import json
import os

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
    """(training step records, validation records) of a checkpoint directory."""
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
