"""
Export to, and import from, Hugging Face transformers, exactly or not at all. What is particular to an architecture
(its transformers model type and class, config, weight names, what it refuses) is its ModelSpec's `hf` (an
HFMapping, nanochat/models/hf_mapping.py): gpt <-> transformers' `nanochat`, alcoholic <-> `qwen3`. This file does
what is common: the registry lookups, the tokenizer, the directory, the model card.
A config with no exact equivalent on the other side is refused with the reason: never a subtly different model.
The tokenizer goes both ways too: tiktoken ranks <-> a byte-level BPE tokenizer.json (merges rebuilt from the ranks),
with a chat template that renders conversations as RustBPETokenizer.render_conversation does.
"""

import json
import os

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from nanochat.checkpoint import CheckpointError, build_model_from_meta, checkpoint_dir, list_steps, save_checkpoint
from nanochat.fileio import get_base_dir
from nanochat.log import UserError
from nanochat.models import MODEL_TYPES, config_to_dict, get_model_spec
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, TokenizerNotFound, get_tokenizer

try:
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
except ImportError as e:  # an optional dependency: only export/import needs it
    raise UserError("export/import to Hugging Face needs transformers>=5: pip install -e '.[hf]'") from e


class HFError(UserError):
    """A model or directory with no exact equivalent on the other side; the message gives the reasons."""


# -----------------------------------------------------------------------------
# The registry's mappings


def mappings():
    """transformers model_type -> (our model_type, its HFMapping), for every registered architecture that has one."""
    return {spec.hf.hf_type: (model_type, spec.hf) for model_type, spec in MODEL_TYPES.items() if spec.hf is not None}


def mapping(model_type):
    """The HFMapping of one of our architectures; one without is refused."""
    found = get_model_spec(model_type).hf
    if found is None:
        supported = ", ".join(f"{ours} -> '{hf_type}'" for hf_type, (ours, _) in mappings().items())
        raise HFError(f"the {model_type!r} architecture has no transformers mapping (its ModelSpec has no "
                      f"hf), so it cannot be exported; architectures that can: {supported}")
    return found


# -----------------------------------------------------------------------------
# Export: config and weights


def export_refusals(model_type, config, ignore_dropout=False):
    """Why this config has no exact transformers equivalent ([] if it has one)."""
    return mapping(model_type).export_refusals(config, ignore_dropout)


def hf_config(model_type, config, tokenizer=None):
    """The transformers config of our model (the special-token ids come from the tokenizer, when given)."""
    ids = {}
    if tokenizer is not None:
        bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
        ids = dict(bos_token_id=bos, eos_token_id=[end, bos], pad_token_id=bos)
    return mapping(model_type).hf_config(config, ids)


@torch.no_grad()
def hf_state_dict(model):
    """Our weights under transformers' names."""
    return mapping(model.model_type).state_dict_to_hf(model)


def check_exportable(model, ignore_dropout=False):
    reasons = export_refusals(model.model_type, model.config, ignore_dropout)
    if reasons:
        raise HFError(f"this {model.model_type} model has no exact transformers '{mapping(model.model_type).hf_type}' "
                      f"equivalent: {'; '.join(reasons)}")


def to_hf(model, tokenizer=None, ignore_dropout=False):
    """The transformers model (fp32, eval mode) that computes the same logits as ours."""
    check_exportable(model, ignore_dropout)
    config = hf_config(model.model_type, model.config, tokenizer)
    hf = getattr(transformers, mapping(model.model_type).hf_class)(config)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken ranks <-> byte-level BPE


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


def tokenizer_from_hf(path):
    """tokenizer.json (byte-level BPE with our special tokens, as hf_tokenizer writes it) -> RustBPETokenizer.
    Anything tiktoken would encode differently is refused."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
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
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"] or steps[1].get("use_regex") or \
            split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
        problems.append("its pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=false)")
    if problems:
        raise HFError(f"{path} cannot be converted to a nanochat tokenizer exactly: {'; '.join(problems)}")
    try:
        ranks = {bytes(CHAR_TO_BYTE[ch] for ch in s): i for s, i in model["vocab"].items()}
    except KeyError:
        raise HFError(f"{path} is not a byte-level BPE: its vocab has tokens outside GPT-2's byte alphabet") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or any(bytes([b]) not in ranks for b in range(256)):
        raise HFError(f"{path}: the BPE vocab must hold ids 0..{n - 1} and all 256 single bytes")
    added = [(t["content"], t["id"]) for t in data.get("added_tokens", [])]
    if added != [(s, n + i) for i, s in enumerate(SPECIAL_TOKENS)]:
        raise HFError(f"{path} has the added tokens {[a for a, _ in added]}, ids {[i for _, i in added]}; nanochat "
                      f"needs exactly {SPECIAL_TOKENS} at ids {n}..{n + len(SPECIAL_TOKENS) - 1} (its chat format)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if merges != [(token_str(a), token_str(b)) for a, b in bpe_merges(ranks)]:
        raise HFError(f"{path}: its merges are not every split of each token in id order, so tiktoken would "
                      f"merge differently from it")
    try:
        return RustBPETokenizer(ranks, split["pattern"]["Regex"])
    except ValueError as e:  # e.g. a regex that tiktoken's engine does not accept
        raise HFError(f"{path}: {e}") from e


# -----------------------------------------------------------------------------
# Export: the directory


def export(model, tokenizer, out_dir, meta=None, dtype=torch.float32, ignore_dropout=False):
    """Write a transformers directory: config.json, model.safetensors, generation_config.json, the tokenizer
    (tokenizer.json, tokenizer_config.json, chat template) and a README.md model card."""
    check_exportable(model, ignore_dropout)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out_dir={out_dir} exists and is not empty; remove it or pick another directory")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise HFError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                      f"{model.config.vocab_size}: they do not belong together")
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(model.model_type, model.config, tokenizer)
    config.architectures = [mapping(model.model_type).hf_class]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_state_dict(model).items()}
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:  # open(), not save_file: the usual permissions
        f.write(safetensors_save(tensors, metadata={"format": "pt"}))
    transformers.GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=tokenizer.get_bos_token_id()).save_pretrained(out_dir)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json, where every version looks for it
    hf_tokenizer_fast(tokenizer, model.config.sequence_len).save_pretrained(out_dir, save_jinja_files=False)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, meta or {}, out_dir))


def model_card(model, meta, out_dir):
    """README.md: what the model is, how it was trained, its metrics, how to use it, the data's licences."""
    mt, hf_type = model.model_type, mapping(model.model_type).hf_type
    front_matter = {"library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": list(dict.fromkeys(["nanochat", mt, hf_type]))}
    metrics = meta.get("metrics") or {}
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                            for k, v in metrics.items() if v is not None) or "| (none recorded) | |"
    chat_data = "" if meta.get("source", "base") == "base" else (
        "- chat stages (mid-training, SFT, RL): SmolTalk (Apache-2.0), MMLU (MIT), GSM8K (MIT), ARC (CC BY-SA 4.0), "
        "the SCOWL word list (spelling tasks; its own notice) and generated chat data (MIT); see "
        "`data/tasks/LICENSES.md` in nanochat (GPT | Alcoholic).\n")
    name = meta.get("model_tag") or os.path.basename(os.path.abspath(out_dir))
    # default_flow_style=None: lists of plain values inline ("tags: [nanochat, gpt]"), the mapping as a block
    return (f"---\n{yaml.safe_dump(front_matter, sort_keys=False, default_flow_style=None)}---\n\n"
            + _card_body(name, mt, hf_type, _card_table(model, meta), metric_rows, chat_data))


def _card_table(model, meta):
    """The model card's summary: architecture, sizes, stage and training tokens."""
    c, mt = model.config, model.model_type
    args, step = meta.get("train_args") or {}, meta.get("step")
    batch = args.get("total_batch_size", -1)
    tokens = f"{step * batch:,} ({step:,} steps x {batch:,} tokens)" if step and batch and batch > 0 else \
        f"{step} steps (batch size picked automatically; see train_args in the checkpoint's meta)"
    rows = [("architecture", f"nanochat `{mt}` -> transformers `{mapping(mt).hf_type}` (`{mapping(mt).hf_class}`)"),
            ("depth (layers)", c.n_layer), ("width, heads, kv heads", f"{c.n_embd}, {c.n_head}, {c.n_kv_head}"),
            ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"), ("context", c.sequence_len),
            ("vocab", c.vocab_size), ("stage", meta.get("source", "?")), ("training tokens", tokens)]
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _card_body(name, mt, hf_type, table, metric_rows, chat_data):
    return f"""# {name}

This `{mt}` model was trained with nanochat (GPT | Alcoholic) and exported to transformers' native `{hf_type}`
architecture: no `trust_remote_code`, and in fp32 its logits are those of the original checkpoint.

| | |
|---|---|
{table}

## Metrics (from the checkpoint)

| metric | value |
|---|---|
{metric_rows}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
messages = [{{"role": "user", "content": "Why is the sky blue?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Generation stops at `<|assistant_end|>` or `<|bos|>`. nanochat encodes user text that spells a special token
(`<|bos|>`) as plain text; transformers turns it into the special token unless you pass `split_special_tokens=True`.

## Training data and licences

- pretraining: FineWeb-edu (`karpathy/fineweb-edu-100b-shuffle`, ODC-By 1.0) when shards were downloaded, otherwise
  the embedded corpus of public-domain texts (Austen, the King James Bible, Shakespeare; see `data/SOURCES.md` in
  nanochat (GPT | Alcoholic)).
{chat_data}- code: nanochat (GPT | Alcoholic), MIT.
"""


# -----------------------------------------------------------------------------
# Import


def importer(hf_type, what="the config"):
    """(our model_type, its HFMapping) of the architecture that maps transformers' `hf_type`; others are refused."""
    if hf_type not in mappings():
        supported = " and ".join(f"{t!r} (-> {ours})" for t, (ours, _) in mappings().items())
        raise HFError(f"{what} holds a {hf_type!r} model; import supports {supported} only")
    return mappings()[hf_type]


def import_refusals(hf_cfg):
    """Why this transformers config has no exact nanochat equivalent ([] if it has one)."""
    return importer(hf_cfg.model_type)[1].import_refusals(hf_cfg)


def config_from_hf(hf_cfg):
    """(model_type, our config) of a transformers config of a type some architecture maps; refuses inexact ones."""
    model_type, found = importer(hf_cfg.model_type)
    reasons = found.import_refusals(hf_cfg)
    if reasons:
        raise HFError(f"this {hf_cfg.model_type} model has no exact nanochat equivalent: {'; '.join(reasons)}")
    try:
        return model_type, found.config_from_hf(hf_cfg)
    except ValueError as e:
        raise HFError(f"this {hf_cfg.model_type} config does not fit our model: {e}") from e


def state_dict_from_hf(model_type, sd, tied):
    """transformers' weights -> ours. Tied embeddings become an lm_head copy: the same logits, untied from here on."""
    found = mapping(model_type)
    if tied:
        sd = {k: v for k, v in sd.items() if k != found.lm_head_key}
        sd[found.lm_head_key] = sd[found.embedding_key].clone()
    return found.state_dict_from_hf(sd)


def read_hf_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf_type = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; --hf_dir must be a transformers model directory") from e
    importer(hf_type, hf_dir)
    return transformers.AutoConfig.from_pretrained(hf_dir)  # also reads older layouts (rope_theta at the top)


def read_hf_weights(hf_dir):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json, as fp32."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(f"no model.safetensors in {hf_dir} (only safetensors weights are imported: they run no code)")
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(hf_dir, name)))
    # rotary tables are computed, not loaded (some old saves hold them)
    return {k: v.float() for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


def import_dir(hf_dir, model_tag, source="base", overwrite_tokenizer=False):
    """A transformers directory (of a type that an architecture maps) -> a checkpoint in
    {source}_checkpoints/{model_tag}/ (step 0) and its tokenizer in $NANOCHAT_BASE_DIR/tokenizer. Returns the
    checkpoint directory."""
    hf_cfg = read_hf_config(hf_dir)
    model_type, config = config_from_hf(hf_cfg)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise UserError(f"no tokenizer.json in {hf_dir}: nanochat needs the model's tokenizer too")
    tokenizer = tokenizer_from_hf(tok_path)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise HFError(f"{tok_path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                      f"vocab_size={config.vocab_size}")
    ckpt_dir = checkpoint_dir(source, model_tag)
    if list_steps(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} already holds a checkpoint; pick another --model_tag or remove it")
    tok_dir = os.path.join(get_base_dir(), "tokenizer")
    try:
        existing = get_tokenizer()
    except TokenizerNotFound:
        existing = None
    if existing is not None and existing.hash != tokenizer.hash and not overwrite_tokenizer:
        raise UserError(f"{tok_dir} holds a different tokenizer ({existing.hash[:12]}, this model's is "
                        f"{tokenizer.hash[:12]}); checkpoints trained with it need it. Use another NANOCHAT_BASE_DIR, "
                        f"or pass --overwrite_tokenizer to replace it")
    sd = state_dict_from_hf(model_type, read_hf_weights(hf_dir), hf_cfg.tie_word_embeddings)
    model = build_model_from_meta(hf_dir, {"model_type": model_type, "model_config": config_to_dict(config)}, sd, "cpu")
    meta = {"tokenizer_hash": tokenizer.hash, "imported_from": os.path.abspath(hf_dir),
            "hf_model_type": hf_cfg.model_type,
            "untied_embeddings": bool(hf_cfg.tie_word_embeddings)}  # lm_head started as a copy of the embedding
    save_checkpoint(ckpt_dir, 0, model, meta)
    if existing is None or existing.hash != tokenizer.hash:
        tokenizer.save(tok_dir)
    return ckpt_dir
