"""
Chat with a model in the terminal.

    python -m scripts.chat_cli                           # the largest sft model, interactive
    python -m scripts.chat_cli -i mid --model_tag=alcoholic_d4
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one reply, then exit
    python -m scripts.chat_cli -i base -p "The capital of France is"   # base models complete text

Interactive commands: `clear` starts a new conversation, `quit` or `exit` (or Ctrl-D) ends.
"""


from nanochat.checkpoint import load_model, resolve_source
from nanochat.cli import parse, run_cli
from nanochat.config import ChatCliConfig
from nanochat.dist import autocast_ctx, compute_init
from nanochat.engine import Engine


def tokens_to_parts(tokenizer, tokens):
    """An assistant reply as conversation parts (text / python / python_output), so that rendering the history
    again gives the model back its tool calls and their results as special tokens, not as text."""
    special = {tokenizer.encode_special(s): s for s in
               ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    starts = {"<|python_start|>": "python", "<|output_start|>": "python_output"}
    parts, kind, current = [], "text", []

    def close():
        if current or kind != "text":
            parts.append({"type": kind, "text": tokenizer.decode(current)})

    for token in tokens:
        name = special.get(token)
        if name in starts:
            close()
            kind, current = starts[name], []
        elif name is not None:  # an end marker
            close()
            kind, current = "text", []
        else:
            current.append(token)
    close()
    return parts


# how a tool call reads in the terminal: "[calculator: 347+85 = 432]"
TOOL_MARKERS = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " = ",
                "<|output_end|>": "]"}


def stream_reply(engine, prompt, args, ends):
    """Print the reply as it is generated; returns its tokens (without the ending token)."""
    tokenizer = engine.tokenizer
    markers = {tokenizer.encode_special(name): text for name, text in TOOL_MARKERS.items()}
    tokens, pending = [], []
    with autocast_ctx(engine.model.get_device().type):
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                         temperature=args.temperature, top_k=args.top_k):
            token = column[0]
            if token in ends:
                break
            tokens.append(token)
            if token in markers:
                print(tokenizer.decode(pending) + markers[token], end="", flush=True)
                pending = []
                continue
            pending.append(token)
            text = tokenizer.decode(pending)
            if not text.endswith("\ufffd"):  # hold back a multi-byte character until it is complete
                print(text, end="", flush=True)
                pending = []
    if pending:
        print(tokenizer.decode(pending), end="", flush=True)
    print(flush=True)
    return tokens


def reply(engine, messages, args, chat):
    """One turn: render the prompt, check it fits, stream the reply. Returns the reply's tokens, or None."""
    tokenizer = engine.tokenizer
    if chat:
        prompt = tokenizer.render_for_completion({"messages": messages})
    else:
        prompt = tokenizer.encode(messages[-1]["content"], prepend=tokenizer.get_bos_token_id())
    context = engine.model.config.sequence_len
    if len(prompt) >= context:
        print(f"[the prompt is {len(prompt)} tokens but the model's context is {context}; "
              f"{'type clear to start over' if chat else 'shorten it'}]")
        return None
    ends = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    return stream_reply(engine, prompt, args, ends)


def main(argv=None):
    args = parse(ChatCliConfig, argv, prog="chat_cli.py", description=__doc__)
    _, _, _, _, device = compute_init(args.device_type)
    source = resolve_source(args.source, args.model_type)
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                        model_type=args.model_type)
    if args.compile:
        model.compile_decode()
    engine = Engine(model, tokenizer)
    chat = source != "base"
    print(f"{meta['model_tag']} ({meta['model_type']}, {source}, step {meta['step']}) on {device}")
    if not chat:
        print("Note: a base model has not learned the chat format; it continues your text as a document.")

    messages = []
    if args.prompt:
        messages.append({"role": "user", "content": args.prompt})
        reply(engine, messages, args, chat)
        return
    print("Type a message; 'clear' starts over, 'quit' or 'exit' ends.")
    while True:
        try:
            text = input("\nUser: " if chat else "\nText: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            messages = []
            print("[new conversation]")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        if chat:
            print("\nAssistant: ", end="", flush=True)
        try:
            tokens = reply(engine, messages, args, chat)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n[interrupted]")
            tokens = None
        if tokens is None or not chat:
            messages.pop()  # base models complete each text on its own; a failed turn is not kept
        else:
            messages.append({"role": "assistant", "content": tokens_to_parts(tokenizer, tokens)})


if __name__ == "__main__":
    run_cli(main)
