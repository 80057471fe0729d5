#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, offline, on the embedded corpus: data -> tokenizer -> pretrain a tiny GPT
# and a tiny Alcoholic -> evaluate both (bpb, CORE, ARC-Easy) -> side-by-side report -> a first chat.
# Usage: bash runs/quickstart.sh            (NANOCHAT_BASE_DIR defaults to ~/.cache/nanochat)
#        QUICK_STEPS=50 bash runs/quickstart.sh   (fewer training steps)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source runs/setup_env.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
STEPS="${QUICK_STEPS:-200}"
# A d4 model (4 layers, width 256) with 256-token contexts: ~6M parameters, trains in minutes on 2 cores in fp32
TRAIN_ARGS="--depth=4 --max_seq_len=256 --device_batch_size=8 --num_iterations=$STEPS --eval_every=50 --sample_every=-1"
step() { echo; echo "=== $* ==="; }
t0=$(date +%s)

step "1/7 data: embedded public-domain corpus -> parquet shards in $NANOCHAT_BASE_DIR/embedded_data"
python -c "from nanochat.dataset import build_embedded_shards; build_embedded_shards()"

step "2/7 tokenizer: 4096-token BPE on the embedded corpus"
python -m scripts.tok_train --vocab_size=4096
python -m scripts.tok_eval

for MT in gpt alcoholic; do
    step "3/7 pretraining: $MT (d4, $STEPS steps)"
    python -m scripts.base_train --model_type=$MT $TRAIN_ARGS
done

for MT in gpt alcoholic; do
    step "4/7 evaluation: $MT (bits per byte, CORE on the offline bundle, ARC-Easy)"
    python -m scripts.base_loss --model_tag=${MT}_d4 --device_batch_size=8 --split_tokens=32768
    python -m scripts.base_eval --model_tag=${MT}_d4 --max_per_task=50
    python -m scripts.chat_eval -i base --model_tag=${MT}_d4 -a ARC-Easy --max_problems=100
done

step "5/7 side-by-side report"
python -m scripts.compare --model_tags gpt_d4 alcoholic_d4

step "6/7 a first completion from each model"
for MT in gpt alcoholic; do
    python -m scripts.chat_cli -i base --model_tag=${MT}_d4 -p "It is a truth universally acknowledged" --max_tokens=32
done

step "7/7 done in $(( $(date +%s) - t0 ))s"
cat <<EOF
Checkpoints: $NANOCHAT_BASE_DIR/base_checkpoints/{gpt_d4,alcoholic_d4}
Report:      $NANOCHAT_BASE_DIR/report/compare.md (+ compare.png)
Chat in the terminal:  source .venv/bin/activate && python -m scripts.chat_cli -i base --model_tag=alcoholic_d4
Chat in the browser:   python -m scripts.chat_web --source=base --model_tag=gpt_d4 --model_tag=alcoholic_d4
                       then open http://127.0.0.1:8000
Bigger runs on GPUs:   see runs/speedrun.sh and the README.
EOF
