"""
Side-by-side report of checkpoints (default: every base checkpoint): a markdown table and loss/bpb plots (PNG).
    python -m scripts.compare                          # all base checkpoints
    python -m scripts.compare --model_tags gpt_d4 alcoholic_d4
"""

import argparse

from nanochat.checkpoint import SOURCE_DIRS, list_model_tags
from nanochat.common import parse_args, run_cli
from nanochat.report import write_report


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare checkpoints side by side (markdown + PNG plots)")
    p.add_argument("-i", "--source", default="base", choices=list(SOURCE_DIRS))
    p.add_argument("--model_tags", nargs="*", default=None, help="default: every checkpoint of the source")
    p.add_argument("--out_dir", default=None, help="default: $NANOCHAT_BASE_DIR/report")
    args = parse_args(p, argv)
    tags = args.model_tags or list_model_tags(args.source)
    if not tags:
        raise SystemExit(f"no {args.source} checkpoints to compare; train some first (python -m scripts.base_train)")
    md_path, png, text = write_report(args.source, tags, args.out_dir)
    print(text)
    print(f"Report: {md_path}\nPlots:  {png}")


if __name__ == "__main__":
    run_cli(main)
