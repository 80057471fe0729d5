#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, offline, on the embedded data, for GPT and Alcoholic side by side:
# data -> tokenizer -> pretrain -> evaluate (bpb, CORE, ARC-Easy) -> mid-train -> SFT -> RL -> chat_eval of base,
# SFT and RL -> comparison report -> a calculator-using answer from each chat model.
# Usage: bash runs/quickstart.sh            (NANOCHAT_BASE_DIR defaults to ~/.cache/nanochat)
#        QUICK_STEPS=50 bash runs/quickstart.sh   (fewer pretraining steps; the other stages scale with it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source runs/setup_env.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
STEPS="${QUICK_STEPS:-200}"
MID_STEPS=$(( STEPS * 3 / 10 )); SFT_STEPS=$(( STEPS * 3 / 4 )); RL_STEPS=$(( STEPS * 3 / 20 > 1 ? STEPS * 3 / 20 : 2 ))
# A d4 model (4 layers, width 256) with 256-token contexts: ~6M parameters, trains in minutes on one core in fp32
TRAIN_ARGS="--depth=4 --max_seq_len=256 --device_batch_size=8 --num_iterations=$STEPS --eval_every=50 --sample_every=-1"
# the chat evaluation: 100 held-out arithmetic questions (answered through the calculator), spelling, ARC-Easy
EVAL_ARGS="-x 100 -m 48"
step() { echo; echo "=== $* ==="; }
t0=$(date +%s)

python -m nanochat.report reset   # a new run report: environment, git commit, start time

step "1/6 data: embedded public-domain corpus -> parquet shards in $NANOCHAT_BASE_DIR/embedded_data"
python -c "from nanochat.dataset import build_embedded_shards; build_embedded_shards()"

step "2/6 tokenizer: 4096-token BPE on the embedded corpus"
python -m scripts.tok_train --vocab_size=4096
python -m scripts.tok_eval

# Everything for one architecture, from pretraining to the chat evaluation
pipeline() {
    local MT=$1 TAG=$1_d4
    step "3/6 [$MT] pretraining (d4, $STEPS steps) and base evaluation"
    python -m scripts.base_train --model_type=$MT $TRAIN_ARGS
    python -m scripts.base_loss --model_tag=$TAG --device_batch_size=8 --split_tokens=32768
    python -m scripts.base_eval --model_tag=$TAG --max_per_task=12 --bundle_dir=data/eval_bundle  # offline; a d4 model is at chance
    step "4/6 [$MT] mid-training ($MID_STEPS steps) -> SFT ($SFT_STEPS steps) -> RL ($RL_STEPS steps)"
    python -m scripts.mid_train --model_tag=$TAG --num_iterations=$MID_STEPS --eval_every=50 --eval_steps=8
    # 2% of the base learning rates (nanochat's default for large models) moves a 6M-parameter model too little
    python -m scripts.chat_sft --model_tag=$TAG --num_iterations=$SFT_STEPS --init_lr_frac=0.5 --eval_every=50 \
        --eval_steps=8
    # RL at 20% of the base learning rates: at nanochat's 5% 20 steps barely move the policy, at 50% it collapses
    python -m scripts.chat_rl --model_tag=$TAG --num_iterations=$RL_STEPS --examples_per_step=8 --num_samples=8 \
        --max_new_tokens=48 --eval_examples=32 --init_lr_frac=0.2
    step "5/6 [$MT] chat_eval: base, SFT and RL side by side"
    for SRC in base sft rl; do
        python -m scripts.chat_eval -i $SRC --model_tag=$TAG -a "Arithmetic|ARC-Easy" $EVAL_ARGS
        python -m scripts.chat_eval -i $SRC --model_tag=$TAG -a SpellingBee -x 20 -m 192
    done
}

# The two architectures run side by side, one core each (one after the other on a single core)
CORES=$(nproc)
if [ "$CORES" -ge 2 ]; then
    export OMP_NUM_THREADS=$(( CORES / 2 ))
    ( pipeline gpt 2>&1 | sed -u "s/^/[gpt]       /" ) &
    GPT_PID=$!
    ( pipeline alcoholic 2>&1 | sed -u "s/^/[alcoholic] /" ) &
    ALC_PID=$!
    status=0
    wait $GPT_PID || status=$?
    wait $ALC_PID || status=$?
    [ $status -eq 0 ] || { echo "quickstart: a pipeline failed (see the lines above)" >&2; exit $status; }
    unset OMP_NUM_THREADS
else
    pipeline gpt
    pipeline alcoholic
fi

step "6/6 side-by-side report and a calculator-using answer from each chat model"
python -m scripts.compare --model_tags gpt_d4 alcoholic_d4
# the first question of the held-out arithmetic split (chat_eval's Arithmetic), never seen in training
QUESTION=$(python -c 'from tasks.arithmetic import ArithmeticTool; print(ArithmeticTool(split="test")[0]["messages"][0]["content"])')
for MT in gpt alcoholic; do
    python -m scripts.chat_cli -i sft --model_tag=${MT}_d4 -t 0 -p "$QUESTION"
done

python -m nanochat.report generate  # every stage's section, in pipeline order, with a summary table
echo; echo "=== done in $(( $(date +%s) - t0 ))s ==="
cat <<EOF
Checkpoints: $NANOCHAT_BASE_DIR/{base,mid,chatsft,chatrl}_checkpoints/{gpt_d4,alcoholic_d4}
Run report:  $NANOCHAT_BASE_DIR/report/report.md
Comparison:  $NANOCHAT_BASE_DIR/report/compare.md (+ compare.png)
Chat in the terminal:  source .venv/bin/activate && python -m scripts.chat_cli --model_tag=alcoholic_d4
Chat in the browser:   python -m scripts.chat_web --model_tag=gpt_d4 --model_tag=alcoholic_d4
                       then open http://127.0.0.1:8000
Bigger runs on GPUs:   see runs/speedrun.sh and the README.
EOF
