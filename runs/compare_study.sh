#!/usr/bin/env bash
# GPT or Alcoholic, answered fairly (the README's section of that name): each arm at its own best learning rate,
# down to chat quality, across depths, and which of Alcoholic's choices makes the difference. On a 2-core CPU with the
# embedded corpus this takes several hours; every finished run is reused, so it can be stopped and started again.
#   bash runs/compare_study.sh             # d2-d8 on CPU (the README's figures)
#   DEPTHS="12 16 20" FLAGS="--max_seq_len=2048 --device_batch_size=16 --total_batch_size=524288" \
#       NUM_ITERATIONS=2000 bash runs/compare_study.sh      # the same study on GPUs (set NPROC for torchrun)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source runs/setup_env.sh
DEPTHS="${DEPTHS:-4 2 6 8}"            # d4 first: the depth of the ablation, and of the quickstart's models
NUM_ITERATIONS="${NUM_ITERATIONS:-200}"
FLAGS="${FLAGS:---max_seq_len=256 --device_batch_size=4}"
NPROC="${NPROC:-1}"
REPORT="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/report"
# shellcheck disable=SC2086
study() {
    python -m scripts.compare --model_types gpt alcoholic --seeds 3 --num_iterations "$NUM_ITERATIONS" --param_match \
        --lr_sweep=0.5,1,2 --chat --chat_max_problems=100 --core_max_per_task=0 --tag_prefix=study \
        --nproc_per_node="$NPROC" "$@" $FLAGS
}
done_depths=()
for d in $DEPTHS; do
    study --depth "$d" --out_dir="$REPORT/study_d$d"
    if [ "$d" = 4 ]; then study --depth 4 --ablate --out_dir="$REPORT/study_ablate_d4"; fi
    done_depths+=("$d")
done
study --depth "${done_depths[@]}" --out_dir="$REPORT/study"   # reuses every run: the fit across depths
echo "Reports: $REPORT/study/compare.md (all depths, the fit), $REPORT/study_ablate_d4/compare.md (the ablation)"
