"""
Export to, and import from, Hugging Face transformers, exactly or not at all. What is particular to an architecture
(its transformers model type and class, config, weight names, what it refuses) is its ModelSpec's `hf` (an
HFMapping, nanochat/models/hf_mapping.py): gpt <-> transformers' `nanochat`, alcoholic <-> `qwen3`. This file does
what is common: the registry lookups, the tokenizer, the directory, the model card.
A config with no exact equivalent on the other side is refused with the reason: never a subtly different model.
The tokenizer goes both ways too (nanochat/hf_tokenizer.py). What a directory holds is checked before it is used:
JSON files of a bounded size and nesting, only regular files, weight shards that the index names inside the directory,
sizes within nanochat's limits, finite weights.
"""

import os

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from nanochat.checkpoint import CheckpointError, build_model_from_meta, checkpoint_dir, list_steps, save_checkpoint
from nanochat.fileio import check_regular, get_base_dir, read_json
from nanochat.hf_tokenizer import (  # noqa: F401 (re-exported: the tokenizer conversion is part of this interface)
    CHAT_TEMPLATE,
    HFError,
    bpe_merges,
    hf_tokenizer,
    hf_tokenizer_fast,
    tokenizer_from_hf,
    transformers,
)
from nanochat.log import UserError, one_line
from nanochat.models import MODEL_TYPES, check_config, config_to_dict, get_model_spec
from nanochat.tokenizer import TokenizerNotFound, get_tokenizer

# what a transformers config parser or a mapping raises on a value of the wrong type or shape
CONFIG_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError)


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
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_dir(model, tokenizer, out_dir, meta, dtype)
    except OSError as e:  # not writable, not a directory, a full disk
        raise UserError(f"cannot write --out_dir={out_dir}: {one_line(e.strerror or e)}"
                        + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None


def write_dir(model, tokenizer, out_dir, meta, dtype):
    """The files of export() into the existing directory out_dir."""
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
    """(model_type, our config) of a transformers config of a type some architecture maps; refuses inexact ones,
    values of the wrong type and sizes beyond nanochat's limits."""
    model_type, found = importer(hf_cfg.model_type)
    try:
        reasons = found.import_refusals(hf_cfg)
        if reasons:
            raise HFError(f"this {hf_cfg.model_type} model has no exact nanochat equivalent: {'; '.join(reasons)}")
        return model_type, check_config(model_type, found.config_from_hf(hf_cfg))
    except CONFIG_ERRORS as e:
        raise HFError(f"this {hf_cfg.model_type} config does not fit our model: {one_line(e)}") from None


def state_dict_from_hf(model_type, sd, tied):
    """transformers' weights -> ours. Tied embeddings become an lm_head copy: the same logits, untied from here on."""
    found = mapping(model_type)
    if tied:
        if found.embedding_key not in sd:
            raise HFError(f"the weights have no {found.embedding_key}, which tied embeddings need")
        sd = {k: v for k, v in sd.items() if k != found.lm_head_key}
        sd[found.lm_head_key] = sd[found.embedding_key].clone()
    return found.state_dict_from_hf(sd)


def read_hf_config(hf_dir):
    """The transformers config of hf_dir/config.json, once our own reading has checked the file (a regular file of
    bounded size and nesting, an object naming a model type that some architecture maps)."""
    path = os.path.join(hf_dir, "config.json")
    data = read_json(path, error=HFError)
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise HFError(f"{path} is not a transformers config (an object with a model_type); --hf_dir must be a "
                      f"transformers model directory")
    importer(data["model_type"], hf_dir)
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)  # also reads older layouts (rope_theta at the top)
    except Exception as e:  # its validators raise errors of their own kinds; none runs code (no trust_remote_code)
        raise HFError(f"transformers refuses {path}: {one_line(e)}") from None


def shard_path(hf_dir, name, index):
    """hf_dir/name for a file that the index names: a relative path that stays inside hf_dir, never an absolute one,
    '..' or a control character. (Symbolic links in hf_dir are the directory's own, e.g. a hub cache's snapshots.)"""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or \
            not name.isprintable() or ".." in name.split("/"):
        raise HFError(f"{index} names the weights file {name!r}, which is not a file inside {hf_dir}: an index may "
                      f"only name files in its own directory")
    return os.path.join(hf_dir, name)


def weight_files(hf_dir):
    """The safetensors files of hf_dir: those model.safetensors.index.json names, or model.safetensors."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.lexists(index):
        data = read_json(index, error=HFError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index} has no weight_map object (parameter name -> file)")
        return sorted({shard_path(hf_dir, name, index) for name in weight_map.values()})
    if os.path.lexists(os.path.join(hf_dir, "model.safetensors")):
        return [os.path.join(hf_dir, "model.safetensors")]
    raise UserError(f"no model.safetensors in {hf_dir} (only safetensors weights are imported: they run no code)")


def read_hf_weights(hf_dir):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json, as fp32. Every
    file must be a regular file inside hf_dir holding valid safetensors with finite values."""
    sd = {}
    for path in weight_files(hf_dir):
        try:
            sd.update(load_file(check_regular(path, error=HFError)))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFError(f"{path} is not a valid safetensors file: {one_line(e)}") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise HFError(f"the weights in {hf_dir} hold NaN/inf values in {', '.join(bad[:3])}: not a usable model")
    # rotary tables are computed, not loaded (some old saves hold them)
    return {k: v.float() for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


def import_dir(hf_dir, model_tag, source="base", overwrite_tokenizer=False):
    """A transformers directory (of a type that an architecture maps) -> a checkpoint in
    {source}_checkpoints/{model_tag}/ (step 0) and its tokenizer in $NANOCHAT_BASE_DIR/tokenizer. Returns the
    checkpoint directory."""
    hf_cfg = read_hf_config(hf_dir)
    model_type, config = config_from_hf(hf_cfg)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.lexists(tok_path):
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
