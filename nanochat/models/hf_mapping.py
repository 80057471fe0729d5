"""
How an architecture maps onto a Hugging Face transformers model type (nanochat/hf.py does the rest: files,
tokenizer, model card). Each architecture's ModelSpec names its mapping.
"""

def rename(key, renames):
    """Apply (old, new) substring renames to a parameter name, in order."""
    for old, new in renames:
        key = key.replace(old, new)
    return key


class HFMapping:
    """
    How one architecture maps onto one transformers model type, exactly or not at all: a config with no exact
    equivalent on the other side is refused with the reasons, never turned into a subtly different model.
    An architecture's ModelSpec sets `hf=SomeMapping()`; nanochat/hf.py finds it through the registry, for export
    (the model's type) and for import (the mapping whose hf_type is the directory's model_type).
    transformers is an optional dependency: import it inside the methods that need it, never at module level.
    """

    hf_type = None  # transformers' model_type, e.g. "qwen3"
    hf_class = None  # the transformers class, e.g. "Qwen3ForCausalLM"
    renames = ()  # (ours, theirs) substring renames of parameter names, in order (reversed for import)
    # theirs: a model with tied embeddings saves no lm_head; import makes one, a copy of the embedding
    embedding_key, lm_head_key = "model.embed_tokens.weight", "lm_head.weight"

    # Export
    def export_refusals(self, config, ignore_dropout=False):
        """Why this config has no exact transformers equivalent ([] if it has one)."""
        return []

    def hf_config(self, config, token_ids):
        """The transformers config of `config`; token_ids: bos/eos/pad token ids (empty without a tokenizer)."""
        raise NotImplementedError

    def state_dict_to_hf(self, model):
        """Our weights under transformers' names."""
        return {rename(k, self.renames): v for k, v in model.state_dict().items()}

    # Import
    def import_refusals(self, hf_cfg):
        """Why this transformers config has no exact equivalent here ([] if it has one). The checks that hold for
        every architecture of ours: plain RoPE, no biases, no attention dropout alone."""
        reasons = []
        rope = hf_cfg.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            reasons.append(f"rope_type={rope.get('rope_type')!r} (only plain RoPE, no scaling)")
        if getattr(hf_cfg, "attention_bias", False):
            reasons.append("attention_bias=True (our projections have no biases)")
        if getattr(hf_cfg, "attention_dropout", 0.0):
            reasons.append(f"attention_dropout={hf_cfg.attention_dropout} (ours also drops the residual branches)")
        return reasons

    def config_from_hf(self, hf_cfg):
        """Our config of a transformers config that import_refusals accepted (a ValueError if it does not fit)."""
        raise NotImplementedError

    def state_dict_from_hf(self, sd):
        """transformers' weights (untied already) -> ours."""
        return {rename(k, [(new, old) for old, new in reversed(self.renames)]): v for k, v in sd.items()}

    # What every architecture of ours shares with transformers' decoder configs
    @staticmethod
    def shape_to_hf(config):
        c = config
        return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                    num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                    max_position_embeddings=c.sequence_len, attention_bias=False, attention_dropout=0.0,
                    tie_word_embeddings=False)

    @staticmethod
    def shape_from_hf(hf_cfg):
        c = hf_cfg
        return dict(sequence_len=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                    n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads or c.num_attention_heads,
                    n_embd=c.hidden_size)
