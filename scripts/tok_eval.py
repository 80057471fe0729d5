"""
Compression of the trained tokenizer (bytes per token, higher is better) on training and validation documents
and a few built-in snippets, beside GPT-2 / GPT-4 (cl100k) when tiktoken has them cached, and beside two
baselines that need nothing: raw bytes (1.0 by definition) and characters (UTF-8 bytes per character).

    python -m scripts.tok_eval
"""

import tiktoken

from nanochat.cli import parse, run_cli
from nanochat.config import TokEvalConfig
from nanochat.dataset import parquets_iter_batched
from nanochat.log import print0
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

SNIPPETS = {
    "prose": (
        "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He had done so for forty years, "
        "through storms that rattled the windows and calm nights when the sea lay flat as glass. Nobody in the "
        "village could remember a time before him, and he liked it that way."
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n"
        "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
        "    seq = [0, 1]\n"
        "    while len(seq) < n:\n"
        "        seq.append(seq[-1] + seq[-2])\n"
        "    return seq[:n]\n\n"
        "if __name__ == \"__main__\":\n"
        "    print(fibonacci(10))\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, so the minimum is at x = 2 where f(2) = -5. "
        "The integral of f from 0 to 1 is 1 - 6 + 7 = 2. Check: 12345 * 678 = 8369910 and sqrt(144) = 12."
    ),
    "unicode": (
        "Größe und Maß: ça coûte 12,50 €. Привет, мир! 你好，世界。こんにちは世界。안녕하세요 세계. "
        "مرحبا بالعالم. Γειά σου Κόσμε. 🎉🚀✨ naïve café résumé"
    ),
}


def load_samples(max_chars=50_000):
    """Up to max_chars characters of training and validation documents, plus the snippets."""
    samples = {}
    for split in ("train", "val"):
        text = ""
        for docs in parquets_iter_batched(split):
            text += "\n".join(docs) + "\n"
            if len(text) >= max_chars:
                break
        samples[f"{split} docs"] = text[:max_chars]
    samples.update(SNIPPETS)
    return samples


def load_reference_encoders():
    """tiktoken's GPT-2 and GPT-4 encodings if they can be loaded (they are downloaded on first use)."""
    encoders, missing = {}, []
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            encoders[label] = tiktoken.get_encoding(name)
        except Exception as e:  # no network and no cache: report it and compare against the baselines only
            missing.append(f"{label} ({name}): {type(e).__name__}")
    return encoders, missing


def main(argv=None):
    args = parse(TokEvalConfig, argv, prog="tok_eval.py", description=__doc__)
    tokenizer = get_tokenizer()
    samples = load_samples(args.max_chars)
    references, missing = load_reference_encoders()
    encoders = {f"ours ({tokenizer.get_vocab_size()})": lambda s: len(tokenizer.encode(s))}
    for label, enc in references.items():
        encoders[f"{label} ({enc.n_vocab})"] = lambda s, enc=enc: len(enc.encode_ordinary(s))
    encoders["chars"] = len  # character-level baseline: one token per unicode character
    encoders["bytes"] = lambda s: len(s.encode("utf-8"))  # byte-level baseline: ratio 1.0

    print0(f"Compression ratio = UTF-8 bytes / tokens (higher is better), tokenizer hash {tokenizer.hash[:12]}")
    if missing:
        print0(f"not compared (could not load offline): {', '.join(missing)}")
    names = list(encoders)
    header = f"{'sample':<12} {'bytes':>8} " + " ".join(f"{n:>22}" for n in names)
    print0(header)
    print0("-" * len(header))
    table = ["| sample | bytes | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for sample_name, text in samples.items():
        nbytes = len(text.encode("utf-8"))
        cells = []
        for name in names:
            ntok = encoders[name](text)
            cells.append(f"{ntok:>10,} {nbytes / max(ntok, 1):>10.2f}x")
        print0(f"{sample_name:<12} {nbytes:>8,} " + " ".join(f"{c:>22}" for c in cells))
        table.append(f"| {sample_name} | {nbytes:,} | " + " | ".join(" ".join(c.split()) for c in cells) + " |")
    print0("(cells: tokens, bytes/token)")
    get_report().log(section="Tokenizer evaluation", data=["Compression (cells: tokens, bytes/token)", "",
                                                           "\n".join(table)])


if __name__ == "__main__":
    run_cli(main)
