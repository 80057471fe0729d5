#!/usr/bin/env bash
# The whole pipeline on one 8-GPU node with real data (FineWeb-edu), nanochat's speedrun:
#   shards -> tokenizer (65,536 tokens, 2B characters) -> base model d20 -> bpb + CORE -> midtraining -> SFT
#   -> chat evaluation -> report ($NANOCHAT_BASE_DIR/report/report.md)
# Usage: MODEL_TYPE=alcoholic bash runs/speedrun.sh      (default gpt; DEPTH=20, NPROC=8, WANDB_RUN=name, RL=1)
#        bash runs/speedrun.sh --dry                     every stage at toy size on this CPU: 2 processes talking
#                                                        over gloo, the embedded corpus, a few steps each (minutes)
# --dry checks the pipeline itself (flags, torchrun, stage hand-offs, report) where no GPU is at hand; it uses the
# Python on PATH and a fresh NANOCHAT_BASE_DIR (a temporary one unless set), and downloads nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
MODEL_TYPE="${MODEL_TYPE:-gpt}"
WANDB_RUN="${WANDB_RUN:-dummy}"
export OMP_NUM_THREADS=1

if [ "$DRY" = 1 ]; then
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$(mktemp -d -t nanochat-dry-XXXXXX)}"
    NPROC=2
    DEPTH=2
    RL="${RL:-1}"
    # CPU and small everything; 2 ranks x 2 rows x 64 tokens per step
    DEV="--device_type=cpu"
    TOK="--vocab_size=512 --max_chars=3000000"
    BASE="--depth=$DEPTH --max_seq_len=64 --device_batch_size=2 --num_iterations=6 --eval_every=3 --eval_tokens=512
          --sample_every=-1 --save_every=3"
    LOSS="--device_batch_size=2 --split_tokens=512"
    CORE="--max_per_task=12 --bundle_dir=data/eval_bundle"   # shipped bundle; 12 holds its 10-shot prompts
    MID="--chat_data=embedded --device_batch_size=2 --max_seq_len=64 --num_iterations=4 --eval_steps=2"
    SFT="--chat_data=embedded --device_batch_size=2 --num_iterations=4 --eval_steps=2"
    RLF="--chat_data=embedded --device_batch_size=2 --num_iterations=2 --examples_per_step=2 --num_samples=2
         --max_new_tokens=16 --eval_examples=4 --eval_every=-1 --save_every=-1"
    CHAT="-a ARC-Easy|Arithmetic -x 8 -m 16"
    echo "speedrun --dry: every stage at toy size on CPU, 2 gloo processes, in $NANOCHAT_BASE_DIR"
else
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    NPROC="${NPROC:-8}"
    DEPTH="${DEPTH:-20}"
    RL="${RL:-0}"   # nanochat leaves RL out of the speedrun: GSM8K only, and slow
    DEV=""
    TOK="--vocab_size=65536 --max_chars=2000000000"
    BASE="--depth=$DEPTH --run=$WANDB_RUN --save_every=2000 --core_metric_every=2000"
    LOSS=""
    CORE=""
    MID="--run=$WANDB_RUN --chat_data=hub"   # nanochat's mixtures, downloaded below; a missing one is an error
    SFT="--run=$WANDB_RUN --chat_data=hub"
    RLF="--run=$WANDB_RUN --chat_data=hub"
    CHAT=""
    # The environment: uv when it is installed (the CUDA build of torch: the "gpu" group, see pyproject.toml),
    # else .venv with pip (runs/setup_env.sh; on Linux x86_64 PyPI's torch is a CUDA build)
    if command -v uv >/dev/null; then
        uv sync --no-default-groups --group gpu --extra hf   # hf: huggingface_hub for the chat datasets
        source .venv/bin/activate
    else
        source runs/setup_env.sh
    fi
fi
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node=$NPROC"
TAG="${MODEL_TYPE}_d${DEPTH}"
step() { echo; echo "=== $* ==="; }
t0=$(date +%s)

python -m nanochat.report reset

step "data"
if [ "$DRY" = 1 ]; then
    python -c "from nanochat.dataset import build_embedded_shards; build_embedded_shards()"
else
    # ~8 shards for the tokenizer first, the rest (enough for d20 at 20 tokens/param) in the background
    python -m nanochat.dataset -n 8 -w 8
    python -m nanochat.dataset -n 240 -w 8 &
    DOWNLOAD_PID=$!
    # the chat datasets of midtraining, SFT, RL and chat_eval, in the hub's layout under $NANOCHAT_HF_DIR
    python - <<'PY' &
import os
from huggingface_hub import snapshot_download
from tasks.common import hf_datasets_dir
for repo, patterns in {"HuggingFaceTB/smol-smoltalk": ["data/*"], "cais/mmlu": ["all/*", "auxiliary_train/*"],
                       "openai/gsm8k": ["main/*"], "allenai/ai2_arc": ["ARC-Easy/*", "ARC-Challenge/*"],
                       "openai/openai_humaneval": ["openai_humaneval/*"]}.items():
    snapshot_download(repo, repo_type="dataset", allow_patterns=patterns,
                      local_dir=os.path.join(hf_datasets_dir(), repo))
PY
    CHAT_DATA_PID=$!
fi

step "tokenizer"
python -m scripts.tok_train $TOK
python -m scripts.tok_eval
if [ "$DRY" = 0 ]; then wait $DOWNLOAD_PID $CHAT_DATA_PID; fi

step "base model: $MODEL_TYPE d$DEPTH on $NPROC processes"
$TORCHRUN -m scripts.base_train -- --model_type=$MODEL_TYPE $BASE $DEV
$TORCHRUN -m scripts.base_loss -- --model_tag=$TAG $LOSS $DEV
$TORCHRUN -m scripts.base_eval -- --model_tag=$TAG $CORE $DEV

step "midtraining (conversations, tool use, multiple choice)"
$TORCHRUN -m scripts.mid_train -- --model_tag=$TAG $MID $DEV
$TORCHRUN -m scripts.chat_eval -- -i mid --model_tag=$TAG $CHAT $DEV

step "supervised fine-tuning"
$TORCHRUN -m scripts.chat_sft -- --model_tag=$TAG $SFT $DEV
$TORCHRUN -m scripts.chat_eval -- -i sft --model_tag=$TAG $CHAT $DEV

if [ "$RL" = 1 ]; then
    step "reinforcement learning (GSM8K, or generated arithmetic offline)"
    $TORCHRUN -m scripts.chat_rl -- --model_tag=$TAG $RLF $DEV
    $TORCHRUN -m scripts.chat_eval -- -i rl --model_tag=$TAG $([ "$DRY" = 1 ] && echo "-a Arithmetic -x 8 -m 16" || echo "-a GSM8K") $DEV
fi

step "report"
python -m nanochat.report generate
echo "done in $(( $(date +%s) - t0 ))s. Report: $NANOCHAT_BASE_DIR/report/report.md"
echo "Chat with it: python -m scripts.chat_web --source=sft --model_tag=$TAG   (or scripts.chat_cli -i sft)"
