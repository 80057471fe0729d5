"""
The chat data the training scripts consume: mid_mixture(split), sft_mixture(split), rl_task(split), with split
"train" or "val". Each returns a Task; `describe(task)` says how much each component contributes.

Two regimes, chosen by what is on disk (source="auto") or forced (source="hub" | "embedded"):
- hub: nanochat's mixtures, when the Hugging Face datasets they train on are on disk ($NANOCHAT_HF_DIR, see
  tasks/common.py): SmolTalk, MMLU auxiliary_train, GSM8K train, ARC train, plus identity and spelling.
- embedded: nothing downloaded. Arithmetic word problems with the calculator (tasks/arithmetic.py), spelling,
  multiple-choice practice (tasks/mcpractice.py, never the scored test rows), the identity conversations and the
  small SmolTalk template set shipped in data/chat/. Big enough (thousands of conversations) to teach a small
  model something chat_eval can measure (Arithmetic, SpellingBee, ARC/MMLU format).
Validation splits never overlap training data; the embedded ones also avoid what chat_eval scores.
"""

import os

from nanochat.fileio import get_base_dir
from nanochat.log import print0
from tasks.arc import ARC
from tasks.arithmetic import ArithmeticTool
from tasks.common import REPO_DATA_DIR, TaskMixture, hf_datasets_dir, hub_has
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mcpractice import MCPractice
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.userchat import UserConversations

SOURCES = ("auto", "hub", "embedded")
# what each stage's hub mixture trains on: name -> alternative (repo, config, split) locations
SMOLTALK = ("SmolTalk train", [("HuggingFaceTB/smol-smoltalk", "data", "train")])
MMLU_AUX = ("MMLU auxiliary_train", [("cais/mmlu", "auxiliary_train", "train"),
                                     ("cais/mmlu", "all", "auxiliary_train")])
GSM8K_TRAIN = ("GSM8K main train", [("openai/gsm8k", "main", "train")])
ARC_TRAIN = [(f"{subset} train", [("allenai/ai2_arc", subset, "train")]) for subset in ("ARC-Easy", "ARC-Challenge")]
HUB_NEEDS = {"mid": [SMOLTALK, MMLU_AUX, GSM8K_TRAIN], "sft": [*ARC_TRAIN, GSM8K_TRAIN, SMOLTALK],
             "rl": [GSM8K_TRAIN]}

# embedded sizes: arithmetic examples [start, stop) of the train split per stage, so SFT sees fresh problems
MID_ARITHMETIC, SFT_ARITHMETIC = (0, 6000), (6000, 8000)
RL_ARITHMETIC = 20_000  # RL samples its own answers: more problems than it will ever get through
VAL_ARITHMETIC = 500
CHAT_EVAL_SPELLINGBEE = 256  # chat_eval scores SpellingBee test examples 0..255; validation starts after them


def identity_path():
    """nanochat's 1000 identity conversations when downloaded into the base dir, else the ones shipped here."""
    downloaded = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    shipped = os.path.join(REPO_DATA_DIR, "chat", "identity_conversations.jsonl")
    return downloaded if os.path.exists(downloaded) else shipped


def choose_source(stage, source="auto"):
    """'hub' or 'embedded' for a stage (mid|sft|rl), logged in one line with the reason."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {'|'.join(SOURCES)}")
    missing = [name for name, places in HUB_NEEDS[stage] if not any(hub_has(*place) for place in places)]
    where = hf_datasets_dir()
    if source == "hub" and missing:
        raise FileNotFoundError(
            f"{stage} data: source='hub' but {', '.join(missing)} not found under {where}. Download them with "
            f"`huggingface-cli download --repo-type dataset <repo> --local-dir {where}/<repo>` (repos: "
            f"{', '.join(sorted({places[0][0] for name, places in HUB_NEEDS[stage] if name in missing}))}), "
            "or use source='embedded'.")
    if source == "auto":
        source = "embedded" if missing else "hub"
        why = f"{', '.join(missing)} not under {where}" if missing else f"all of its datasets are under {where}"
    else:
        why = "forced by source=" + repr(source)
    print0(f"{stage} data: {source} mixture ({why})")
    return source


def check_split(split):
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be train|val")


def embedded_val():
    """Held-out conversations of every embedded kind: disjoint from training and from what chat_eval scores."""
    return TaskMixture([
        SmolTalk("test"),
        ArithmeticTool(size=VAL_ARITHMETIC, split="val"),
        MCPractice("val"),
        SimpleSpelling(size=200, split="test"),  # chat_eval does not score SimpleSpelling
        SpellingBee(size=CHAT_EVAL_SPELLINGBEE + 200, split="test", start=CHAT_EVAL_SPELLINGBEE),
    ])


def mid_mixture(split="train", source="auto", seed=42):
    """Mid-training: chat format, tool use, multiple choice, identity and spelling."""
    check_split(split)
    source = choose_source("mid", source)
    if source == "hub":
        if split == "val":  # as nanochat: test sets cut to keep the train ratios (these are never trained on)
            return TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5200), GSM8K("main", "test", stop=420)],
                               seed=seed)
        aux = next(place[1:] for place in MMLU_AUX[1] if hub_has(*place))  # the layout that is on disk
        identity = CustomJSON(identity_path())
        return TaskMixture([
            SmolTalk("train"),  # 460K general conversations
            MMLU(*aux),  # 100K multiple choice questions (ARC, MC_TEST, OBQA, RACE)
            GSM8K("main", "train"),  # 8K math problems with calculator calls
            identity, identity,  # 1000 identity conversations, 2 epochs
            SimpleSpelling(size=200_000, split="train"),
            SpellingBee(size=80_000, split="train"),
        ], seed=seed)
    if split == "val":
        return embedded_val()
    identity = CustomJSON(identity_path())
    start, stop = MID_ARITHMETIC
    return TaskMixture([
        ArithmeticTool(size=stop, split="train", start=start),  # stands in for GSM8K: calculator tool use
        MCPractice("train"),  # stands in for MMLU auxiliary_train: the multiple-choice format
        SmolTalk("train"),  # 400 template conversations (data/chat/)
        identity, identity,
        SimpleSpelling(size=2000, split="train"),
        SpellingBee(size=1000, split="train"),
    ], seed=seed)


def sft_mixture(split="train", source="auto", seed=42):
    """Supervised finetuning: a smaller, cleaner mixture than mid-training."""
    check_split(split)
    source = choose_source("sft", source)
    if source == "hub":
        if split == "val":
            return SmolTalk("test")  # as nanochat
        return TaskMixture([
            ARC("ARC-Easy", "train"),  # 2.3K
            ARC("ARC-Challenge", "train"),  # 1.1K
            GSM8K("main", "train"),  # 8K
            SmolTalk("train", stop=10_000),  # 10K
            CustomJSON(identity_path()),  # 1K
            SimpleSpelling(size=300, split="train"),
            SpellingBee(size=300, split="train"),
        ], seed=seed)
    if split == "val":
        return embedded_val()
    start, stop = SFT_ARITHMETIC
    return TaskMixture([
        ArithmeticTool(size=stop, split="train", start=start),
        MCPractice("train", datasets=("ARC",)),  # stands in for ARC train, as nanochat's SFT
        SmolTalk("train"),
        CustomJSON(identity_path()),
        SimpleSpelling(size=300, split="train"),
        SpellingBee(size=300, split="train"),
    ], seed=seed)


def rl_task(split="train", source="auto"):
    """RL: problems with a checkable final answer (task.reward). val: nanochat's GSM8K test / held-out arithmetic."""
    check_split(split)
    if choose_source("rl", source) == "hub":
        return GSM8K("main", split="train" if split == "train" else "test")
    return ArithmeticTool(size=RL_ARITHMETIC if split == "train" else VAL_ARITHMETIC, split=split)


# -----------------------------------------------------------------------------


def component_name(task):
    name = type(task).__name__
    if isinstance(task, CustomJSON):
        return f"{name}({os.path.basename(task.filepath)})"
    if isinstance(task, UserConversations):  # a --data file
        return f"{name}({task.name}, {task.split})"
    details = [str(getattr(task, attr)) for attr in ("subset", "split") if hasattr(task, attr)]
    if isinstance(task, MCPractice):
        details.insert(0, "+".join(task.datasets))
    return f"{name}({', '.join(details)})" if details else name


def sizes(task):
    """[(component, examples it contributes)] in order; a task listed twice counts twice, under one name."""
    counts = {}
    for component in getattr(task, "tasks", [task]):
        name = component_name(component)
        counts[name] = counts.get(name, 0) + len(component)
    return list(counts.items())


def describe(task):
    """One line for the training scripts to print: total, then each component's count and share."""
    parts = sizes(task)
    total = sum(n for _, n in parts)
    return f"{total:,} conversations: " + ", ".join(f"{name} {n:,} ({100 * n / max(total, 1):.0f}%)"
                                                    for name, n in parts)
