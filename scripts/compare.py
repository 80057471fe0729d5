"""
GPT vs Alcoholic, fairly: train and evaluate the runs a comparison needs (several seeds per architecture, the same
data order and token budget for all), then write a side-by-side report: $NANOCHAT_BASE_DIR/report/compare.md + .png.

    python -m scripts.compare --model_types gpt alcoholic --depth 4 --seeds 3 --num_iterations 300 --param_match \\
        --max_seq_len=256 --device_batch_size=4          # any other flag goes to base_train as is
    python -m scripts.compare --model_tags gpt_d4 alcoholic_d4    # only tabulate existing checkpoints
    python -m scripts.compare --model_tags 'cmp_*_d4*' 'cmp_*_d6*'  # ... runs of several comparisons, seeds grouped
    python -m scripts.compare                                     # every base checkpoint
    python -m scripts.compare --model_types gpt alcoholic --depth 4 --data=my_texts/   # on your own text

Runs are tagged {prefix}_{type}_d{depth}[_pm|_fm]_s{seed} (e.g. cmp_gpt_d4_s1); a run whose checkpoint is complete
is reused (its training flags must be the ones asked for), one that was cut short resumes, and only the evaluations
that are missing are run. Each stage is a subprocess (torchrun with --nproc_per_node > 1), so training is
base_train's, memory is measured per run, and a crash leaves the finished runs in place.
--param_match / --flop_match set the MLP width of every type but the first (the field its ModelSpec names, e.g.
alcoholic's intermediate_size) so that its parameter count / FLOPs per token equal the first type's within 1% (SwiGLU
has three MLP matrices, ReLU^2 two), counted on meta-device models by their own num_params_by_group() and
estimate_flops(). See nanochat/compare/.
"""

from nanochat.cli import parse, run_cli
from nanochat.compare.runs import absolute_data_paths, refuse_own_flags
from nanochat.compare.study import study, tabulate
from nanochat.config import BaseTrainConfig, CompareConfig
from nanochat.log import UserError


def main(argv=None):
    config, rest = parse(CompareConfig, argv, prog="compare.py", description=__doc__, known=True)
    if config.model_types is None:  # tabulate existing checkpoints
        if rest:
            raise UserError(f"unknown arguments {' '.join(rest)} (training flags need --model_types)")
        result = tabulate(config)
    else:
        refuse_own_flags(rest)
        rest = absolute_data_paths(rest)  # the runs start in the repository: a relative --data would move
        train = parse(BaseTrainConfig, rest, prog="compare.py (base_train flags)")
        result = study(config, train, rest)
    if result is None:
        return None
    md, png, text = result
    print(text)
    print(f"Report: {md}\nPlots:  {png}")
    return md


if __name__ == "__main__":
    run_cli(main)
