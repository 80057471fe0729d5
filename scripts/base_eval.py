"""
CORE evaluation of a base (or mid/sft) checkpoint: per-task accuracy and centered accuracy, then CORE.

    python -m scripts.base_eval                                  # the largest base model
    python -m scripts.base_eval --model_type=alcoholic --max_per_task=100
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model_tag=gpt_d20

Bundle: --bundle_dir if given, else $NANOCHAT_BASE_DIR/eval_bundle, else the official bundle is downloaded there,
else (offline) the small bundle shipped in data/eval_bundle, whose CORE is not comparable to published numbers.
Results: $NANOCHAT_BASE_DIR/base_eval/{model_tag}_{step}.csv and the checkpoint's metrics (meta file).
"""

import csv
import io
import os

from nanochat import checkpoint
from nanochat.cli import parse, run_cli
from nanochat.config import BaseEvalConfig
from nanochat.core_eval import evaluate_core, prepare_bundle
from nanochat.dist import autocast_ctx, compute_cleanup, compute_init
from nanochat.fileio import atomic_write_bytes, get_base_dir
from nanochat.log import print0
from nanochat.report import get_report


def write_csv(path, out):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Task", "Accuracy", "Centered"])
    for label, acc in out["results"].items():
        w.writerow([label, f"{acc:.6f}", f"{out['centered'][label]:.6f}"])
    w.writerow(["CORE", "", f"{out['core']:.6f}"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode())


def main(argv=None):
    args = parse(BaseEvalConfig, argv, prog="base_eval.py", description=__doc__)
    ddp, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = checkpoint.load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                                   step=args.step, model_type=args.model_type)
    model_tag, step = meta["model_tag"], meta["step"]
    print0(f"Evaluating {args.source} checkpoint {model_tag} step {step} ({meta['model_type']})")

    bundle_dir, note, incomplete = prepare_bundle(args.bundle_dir)
    print0(f"CORE bundle: {bundle_dir} ({note})")

    with autocast_ctx(device.type):
        out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=args.max_per_task)
    partial = incomplete or args.max_per_task > 0
    print0(f"CORE: {out['core']:.4f}" + (f"  ({note}{', subsampled' if args.max_per_task > 0 else ''}; "
                                          f"not comparable to the full benchmark)" if partial else ""))

    if rank == 0:
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step}.csv")
        write_csv(csv_path, out)
        print0(f"wrote {csv_path}")
        metrics = {"core": out["core"], "core_tasks": {k: {"accuracy": v, "centered": out["centered"][k]}
                                                       for k, v in out["results"].items()},
                   "core_bundle": note + (f", max_per_task={args.max_per_task}" if args.max_per_task > 0 else "")}
        checkpoint.record_metrics(args.source, model_tag, step, metrics)
        print0(f"recorded CORE in the metrics of {model_tag} step {step}")
        get_report().log(section="Base model evaluation", data=[{"model_tag": model_tag, "step": step, "bundle":
                         metrics["core_bundle"], **out["centered"], "CORE": out["core"]}])
    compute_cleanup()
    return out


if __name__ == "__main__":
    run_cli(main)
