"""
Pretrain a base model of any registered architecture. One process:
    python -m scripts.base_train --model_type=alcoholic --depth=4 --device_batch_size=1 --num_iterations=50
On your own text (a file or a directory of .txt/.md/.jsonl/.parquet, .gz/.zst too; see nanochat/userdata.py):
    python -m scripts.base_train --data=my_texts/ --depth=4 --max_seq_len=256 --device_batch_size=8
Many GPUs (or CPU processes with gloo):
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --model_type=gpt --depth=20
The script knows nothing of the architecture: the registry builds the model and its flags, the model builds its
optimizers, and nanochat.trainer runs the loop (nanochat/pretrain.py puts them together).
"""

from nanochat.cli import parse, run_cli
from nanochat.config import BaseTrainConfig
from nanochat.pretrain import pretrain
from nanochat.trainer import run_stage


def main(argv=None):
    return run_stage(pretrain, parse(BaseTrainConfig, argv, prog="base_train.py", description=__doc__))


if __name__ == "__main__":
    run_cli(main)
