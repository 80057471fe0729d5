#!/usr/bin/env bash
# The full run on one 8-GPU node with real data (FineWeb-edu): tokenizer on 2B characters, a d20 base model of the
# chosen architecture, then evaluation. Usage: MODEL_TYPE=alcoholic bash runs/speedrun.sh   (default gpt)
# Set WANDB_RUN=name to log to wandb (pip install wandb first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS=1
MODEL_TYPE="${MODEL_TYPE:-gpt}"
DEPTH="${DEPTH:-20}"
NPROC="${NPROC:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
source runs/setup_env.sh   # .venv with torch==2.13.0 (on Linux x86_64 PyPI serves the CUDA build)

# ~8 shards for the tokenizer first, the rest (enough for d20 at 20 tokens/param) in the background
python -m nanochat.dataset -n 8 -w 8
python -m nanochat.dataset -n 240 -w 8 &
DOWNLOAD_PID=$!
python -m scripts.tok_train --vocab_size=65536 --max_chars=2000000000
python -m scripts.tok_eval
wait $DOWNLOAD_PID

torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- \
    --model_type=$MODEL_TYPE --depth=$DEPTH --run=$WANDB_RUN --save_every=2000 --core_metric_every=2000
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss -- --model_tag=${MODEL_TYPE}_d$DEPTH
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --model_tag=${MODEL_TYPE}_d$DEPTH
python -m scripts.compare
echo "Chat with it: python -m scripts.chat_web --source=base --model_tag=${MODEL_TYPE}_d$DEPTH"
