"""
The tokenizer both ways between nanochat and transformers: tiktoken ranks <-> a byte-level BPE tokenizer.json (merges
rebuilt from the ranks), with a chat template that renders conversations as RustBPETokenizer.render_conversation
does. A tokenizer.json that tiktoken would encode differently, or that is not what it claims (wrong types, a list
where an object belongs), is refused with the reason (HFError), never converted into a subtly different tokenizer.
"""

from nanochat.fileio import read_json
from nanochat.log import UserError, one_line
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

try:
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
except ImportError as e:  # an optional dependency: only export/import needs it
    raise UserError("export/import to Hugging Face needs transformers>=5: pip install -e '.[hf]'") from e


class HFError(UserError):
    """A model or directory with no exact equivalent on the other side; the message gives the reasons."""


def bytes_to_unicode():
    """GPT-2's table: every byte -> a printable unicode character (byte-level BPE vocabularies are written in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_str(b):
    return "".join(BYTE_TO_CHAR[x] for x in b)


def bpe_merges(ranks):
    """Merges that make transformers' BPE behave as tiktoken: tiktoken merges any adjacent pair whose concatenation is
    a token, lowest rank first. So every split of a token into two tokens is a merge, ordered by the rank of the
    result (ties between splits by the ranks of the parts, as transformers' own tiktoken converter does)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]])))
    return merges


def hf_tokenizer(tokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer`: the same split regex, then bytes -> GPT-2 characters, then BPE."""
    ranks = tokenizer.mergeable_ranks
    vocab = {token_str(b): r for b, r in ranks.items()}
    merges = [(token_str(a), token_str(b)) for a, b in bpe_merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocab stays whole, as in tiktoken
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    assert all(tok.token_to_id(s) == i for s, i in tokenizer.special_tokens.items()), "special token ids moved"
    return tok


# The conversation as render_conversation + render_for_completion render it: bos; a system message merged into the
# first user message with "\n\n"; user/assistant turns that alternate; assistant content as a str or as parts
# (text / python / python_output); add_generation_prompt -> <|assistant_start|>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- set msgs = messages -%}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{%- set ns.system = msgs[0]['content'] + '\\n\\n' -%}{%- set msgs = msgs[1:] -%}"
    "{%- if not msgs or msgs[0]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] != (loop.index0 % 2 == 0 and 'user' or 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user (after an optional system)') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (ns.system if loop.first else '') + m['content'] + '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def hf_tokenizer_fast(tokenizer, model_max_length=None):
    """What AutoTokenizer.from_pretrained loads back: the tokenizer, its special tokens and the chat template."""
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tokenizer), bos_token="<|bos|>", eos_token="<|assistant_end|>",
        pad_token="<|bos|>", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, **kwargs)


def _shape_problems(data):
    """Why the JSON of a tokenizer.json does not have the types a byte-level BPE tokenizer has ([] if it has)."""
    if not isinstance(data, dict):
        return [f"it holds a JSON {type(data).__name__}, not an object"]
    model, pre, added = data.get("model"), data.get("pre_tokenizer"), data.get("added_tokens", [])
    problems = []
    if not isinstance(model, dict):
        problems.append(f"its model is a {type(model).__name__}, not an object")
    else:
        vocab, merges = model.get("vocab"), model.get("merges", [])
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
            problems.append("its vocab is not an object of token -> integer id")
        if not isinstance(merges, list) or not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(
                isinstance(p, str) for p in m)) for m in merges):
            problems.append("its merges are not a list of 'a b' strings or [a, b] pairs")
    if pre is not None and not (isinstance(pre, dict) and all(isinstance(s, dict) for s in (
            pre.get("pretokenizers", []) if isinstance(pre.get("pretokenizers", []), list) else [None]))):
        problems.append("its pre_tokenizer is not an object (of objects)")
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) and
                                              type(t.get("id")) is int for t in added):
        problems.append("its added_tokens are not a list of {content, id} objects")
    return problems


def _conversion_problems(data):
    """Why tiktoken would encode differently from this (well-typed) tokenizer ([] if it would not)."""
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = steps[0] if steps else {}
    problems = []
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("its model is not a plain BPE")
    elif not model.get("ignore_merges"):
        problems.append("its BPE has ignore_merges=false (tiktoken keeps a piece that is a token whole)")
    if data.get("normalizer") is not None:
        problems.append("it has a normalizer (tiktoken encodes the text as is)")
    pattern = split.get("pattern")
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"] or steps[1].get("use_regex") or \
            split.get("behavior") != "Isolated" or split.get("invert") or not isinstance(pattern, dict) or \
            not isinstance(pattern.get("Regex"), str):
        problems.append("its pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=false)")
    return problems


def tokenizer_from_hf(path):
    """tokenizer.json (byte-level BPE with our special tokens, as hf_tokenizer writes it) -> RustBPETokenizer.
    Anything tiktoken would encode differently, and anything that is not such a file, is refused (HFError)."""
    data = read_json(path, error=HFError)
    problems = _shape_problems(data) or _conversion_problems(data)
    if problems:
        raise HFError(f"{path} cannot be converted to a nanochat tokenizer exactly: {'; '.join(problems)}")
    model = data["model"]
    try:
        ranks = {bytes(CHAR_TO_BYTE[ch] for ch in s): i for s, i in model["vocab"].items()}
    except KeyError:
        raise HFError(f"{path} is not a byte-level BPE: its vocab has tokens outside GPT-2's byte alphabet") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or any(bytes([b]) not in ranks for b in range(256)):
        raise HFError(f"{path}: the BPE vocab must hold ids 0..{n - 1} and all 256 single bytes")
    added = [(t["content"], t["id"]) for t in data.get("added_tokens", [])]
    if added != [(s, n + i) for i, s in enumerate(SPECIAL_TOKENS)]:
        raise HFError(f"{path} has the added tokens {[a for a, _ in added][:12]}, ids {[i for _, i in added][:12]}; "
                      f"nanochat needs exactly {SPECIAL_TOKENS} at ids {n}..{n + len(SPECIAL_TOKENS) - 1} (its chat "
                      f"format)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if merges != [(token_str(a), token_str(b)) for a, b in bpe_merges(ranks)]:
        raise HFError(f"{path}: its merges are not every split of each token in id order, so tiktoken would "
                      f"merge differently from it")
    pre = data["pre_tokenizer"]
    split = (pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre])[0]
    try:
        return RustBPETokenizer(ranks, split["pattern"]["Regex"])
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a regex that tiktoken's engine does not accept
        raise HFError(f"{path}: {one_line(e)}") from None
