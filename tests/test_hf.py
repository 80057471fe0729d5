"""Export to and import from Hugging Face transformers (nanochat/hf.py, scripts/export_hf.py, scripts/import_hf.py):
exact logits, greedy generation, tokenizer and chat template, round trips, and every refusal with its reason."""

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

transformers = pytest.importorskip("transformers")

from nanochat import hf  # noqa: E402
from nanochat.checkpoint import load_model, save_checkpoint  # noqa: E402
from nanochat.cli import run_cli  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.models import MODEL_TYPES, build_model, config_from_depth, config_to_dict, gpt  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

TYPES = ["gpt", "alcoholic"]
SEQ = 64
TEXT = ("Héllo wörld! Naïve café, straße, ÆØÅ, ǅ, ﬁ, Ω ≈ ∑ — “quotes” ‘and’ 12345 6789.\n\n"
        "你好，世界。こんにちは 🙂🙃 👩‍👩‍👧 emoji\tand tabs,   spaces\r\n and don't, we'll, I'M.\n")
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo! What is 2+2? 🙂"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me check: "},
                                      {"type": "python", "text": "2+2"},
                                      {"type": "python_output", "text": "4"},
                                      {"type": "text", "text": " It is 4."}]},
    {"role": "user", "content": "And in 中文?"},
    {"role": "assistant", "content": "四"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator([TEXT * 3, "The quick brown fox jumps over the lazy dog. " * 5], 400)


def make_model(model_type, vocab_size, seed=0, **overrides):
    """Depth 2, width 64, 4 heads of 16 sharing 2 key/value heads, perturbed weights."""
    return tiny_model(model_type, vocab_size, depth=2, max_seq_len=SEQ, head_dim=16, seed=seed,
                      **{"n_embd": 64, "n_kv_head": 2, **overrides})


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """model_type -> (our model, directory it was exported to)."""
    out = {}
    for model_type in TYPES:
        model = make_model(model_type, tokenizer.get_vocab_size())
        out_dir = str(tmp_path_factory.mktemp("export") / model_type)
        hf.export(model, tokenizer, out_dir, meta={"source": "sft", "step": 7, "metrics": {"val_bpb": 1.5}})
        out[model_type] = model, out_dir
    return out


def random_ids(vocab_size, B=2, T=24, seed=0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("model_type", TYPES)
def test_exported_logits_match(exported, model_type):
    model, out_dir = exported[model_type]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(theirs).__name__ == hf.mapping(model_type).hf_class
    for seed in range(3):
        idx = random_ids(model.config.vocab_size, seed=seed)
        with torch.no_grad():
            diff = (model(idx) - theirs(idx).logits).abs().max().item()
        assert diff < 1e-4, f"{model_type}: max abs logit diff {diff}"


@pytest.mark.parametrize("model_type", TYPES)
def test_greedy_generate_matches_engine(exported, tokenizer, model_type):
    model, out_dir = exported[model_type]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    ours, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=32, temperature=0)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert len(ours[0]) == len(prompt) + 32, "the test needs 32 ordinary tokens (no end token)"
    assert out[0].tolist() == ours[0]


def test_tokenizer_encodes_and_decodes_like_ours(exported, tokenizer):
    theirs = transformers.AutoTokenizer.from_pretrained(exported["gpt"][1])
    samples = [TEXT, TEXT[::-1], "  leading", "trailing  ", "a\n\n\nb", "x" * 40, "🙂" * 5, "<|bos|> as text", ""]
    for text in samples:
        ids = tokenizer.encode(text)
        assert theirs.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, repr(text)
        assert theirs.decode(ids) == text
    specials = list(tokenizer.special_tokens.values())
    assert theirs.decode(specials) == tokenizer.decode(specials)


def test_chat_template_matches_render(exported, tokenizer):
    theirs = transformers.AutoTokenizer.from_pretrained(exported["alcoholic"][1])
    prompt = theirs.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)["input_ids"]
    assert prompt == tokenizer.render_for_completion({"messages": CONVERSATION[:4]})
    full = theirs.apply_chat_template(CONVERSATION)["input_ids"]
    assert full == tokenizer.render_conversation({"messages": CONVERSATION}, max_tokens=None)[0]
    with pytest.raises(Exception, match="alternate"):
        theirs.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_export_directory(exported, tokenizer):
    out_dir = exported["alcoholic"][1]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(os.listdir(out_dir))
    with open(os.path.join(out_dir, "generation_config.json")) as f:
        gen = json.load(f)
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    assert gen["eos_token_id"] == [end, bos] and gen["bos_token_id"] == bos
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["bos_token"] == "<|bos|>" and "chat_template" in tok_config
    with open(os.path.join(out_dir, "README.md")) as f:
        card = f.read()
    assert "qwen3" in card and "val_bpb" in card and "ODC-By" in card
    _, front_matter, body = card.split("---\n", 2)
    assert yaml.safe_load(front_matter) == {"library_name": "transformers", "pipeline_tag": "text-generation",
                                            "tags": ["nanochat", "alcoholic", "qwen3"]}
    assert body.startswith("\n# ")


def test_rms_norm_default_eps_is_fp32_epsilon():
    """gpt.NORM_EPS: F.rms_norm(eps=None) uses fp32's epsilon, for bf16 inputs too (their math type is fp32)."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 8).to(dtype) * 1e-4  # tiny values, so that eps matters
        expected = F.rms_norm(x.float(), (8,), eps=gpt.NORM_EPS).to(dtype)
        assert torch.equal(F.rms_norm(x, (8,)), expected)


# -----------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("override, reason", [
    (dict(logit_softcap=30.0), "logit_softcap=30.0"),
    (dict(norm_type="layernorm"), "norm_type='layernorm'"),
    (dict(mlp_type="relu2"), "mlp_type='relu2'"),
    (dict(qk_norm=False), "qk_norm=False"),
    (dict(dropout=0.1), "dropout=0.1 .*--ignore_dropout"),
])
def test_export_refuses_inexact_alcoholic(tokenizer, tmp_path, override, reason):
    model = build_model("alcoholic", config_from_depth("alcoholic", 1, SEQ, tokenizer.get_vocab_size(), n_embd=64,
                                                       head_dim=16, **override))
    with pytest.raises(hf.HFError, match=reason):
        hf.export(model, tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_with_ignore_dropout(tokenizer, tmp_path):
    model = make_model("alcoholic", tokenizer.get_vocab_size(), dropout=0.1)
    hf.export(model, tokenizer, str(tmp_path / "out"), ignore_dropout=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(idx) - theirs(idx).logits).abs().max() < 1e-4


def qwen3_config(**overrides):
    kw = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return transformers.Qwen3Config(**{**kw, **overrides})


def nanochat_config(**overrides):
    kw = dict(vocab_size=400, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=gpt.NORM_EPS,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.NanoChatConfig(**{**kw, **overrides})


@pytest.mark.parametrize("config, reason", [
    (lambda: qwen3_config(use_sliding_window=True, sliding_window=16, max_window_layers=1), "sliding-window"),
    (lambda: qwen3_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), "rope_type"),
    (lambda: qwen3_config(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda: qwen3_config(attention_bias=True), "attention_bias"),
    (lambda: nanochat_config(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (lambda: nanochat_config(final_logit_softcapping=None), "final_logit_softcapping=None"),
    (lambda: nanochat_config(rms_norm_eps=1e-6), "rms_norm_eps=1e-06"),
    (lambda: nanochat_config(intermediate_size=128), "intermediate_size=128"),
    (lambda: nanochat_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "rope_theta"),
])
def test_import_refuses_inexact_configs(config, reason):
    with pytest.raises(hf.HFError, match=reason):
        hf.config_from_hf(config())


def test_import_refuses_other_architectures(tmp_path):
    transformers.LlamaConfig(vocab_size=400, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=128).save_pretrained(tmp_path)
    with pytest.raises(hf.HFError, match="'llama' model; import supports 'nanochat' .-> gpt. and 'qwen3' .-> alc"):
        hf.import_dir(str(tmp_path), "imported")


# -----------------------------------------------------------------------------
# Import


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.mark.parametrize("model_type", TYPES)
def test_export_import_round_trip(exported, base_dir, model_type):
    model, out_dir = exported[model_type]
    hf.import_dir(out_dir, "imported", source="sft")
    imported, _, meta = load_model("sft", model_tag="imported")
    assert meta["model_type"] == model_type
    # the HF side round-trips bit for bit: exporting the imported model gives the same weights and config
    again = hf.hf_state_dict(imported)
    first = hf.hf_state_dict(model)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert hf.hf_config(model_type, imported.config).to_dict() == hf.hf_config(model_type, model.config).to_dict()
    if model_type == "gpt" or not model.config.embed_norm:  # ours too, unless embed_norm was folded away
        assert config_to_dict(imported.config) == config_to_dict(model.config)
        sd, sd2 = model.state_dict(), imported.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(idx) - imported(idx)).abs().max() < 1e-5


def test_round_trip_is_bit_exact_without_embed_norm(tokenizer, base_dir, tmp_path):
    model = make_model("alcoholic", tokenizer.get_vocab_size(), embed_norm=False)
    hf.export(model, tokenizer, str(tmp_path / "out"))
    hf.import_dir(str(tmp_path / "out"), "imported")
    imported, _, _ = load_model("base", model_tag="imported")
    assert config_to_dict(imported.config) == config_to_dict(model.config)
    sd, sd2 = model.state_dict(), imported.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.parametrize("hf_type, tied", [("qwen3", False), ("qwen3", True), ("nanochat", False),
                                           ("nanochat", True)])
def test_import_directory_written_by_transformers(tokenizer, base_dir, tmp_path, hf_type, tied):
    """A model saved by transformers itself (random weights, bf16 on disk) + a tokenizer saved by transformers."""
    vocab = tokenizer.get_vocab_size()
    config = (qwen3_config if hf_type == "qwen3" else nanochat_config)(vocab_size=vocab, tie_word_embeddings=tied)
    torch.manual_seed(0)
    theirs = getattr(transformers, "Qwen3ForCausalLM" if hf_type == "qwen3" else "NanoChatForCausalLM")(config)
    with torch.no_grad():
        for p in theirs.parameters():  # norms away from 1; values that bf16 holds exactly
            p.copy_((p + 0.1 * torch.randn_like(p)).bfloat16().float())
    copy.deepcopy(theirs).to(torch.bfloat16).save_pretrained(tmp_path / "hf")  # bf16 on disk, as released models
    hf.hf_tokenizer_fast(tokenizer).save_pretrained(tmp_path / "hf")
    hf.import_dir(str(tmp_path / "hf"), "imported")
    ours, ours_tokenizer, meta = load_model("base", model_tag="imported")
    assert meta["model_type"] == ("alcoholic" if hf_type == "qwen3" else "gpt")
    assert ours_tokenizer.hash == tokenizer.hash
    theirs.eval()
    idx = random_ids(vocab)
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max() < 1e-4


def test_import_refuses_to_replace_a_different_tokenizer(exported, tokenizer, base_dir):
    other = RustBPETokenizer.train_from_iterator(["completely different text, " * 20], 300)
    other.save(str(base_dir / "tokenizer"))
    out_dir = exported["gpt"][1]
    with pytest.raises(hf.UserError, match="different tokenizer.*--overwrite_tokenizer"):
        hf.import_dir(out_dir, "imported")
    assert not (base_dir / "base_checkpoints" / "imported").exists()
    hf.import_dir(out_dir, "imported", overwrite_tokenizer=True)
    _, loaded, _ = load_model("base", model_tag="imported")
    assert loaded.hash == tokenizer.hash


def test_tokenizer_with_other_special_tokens_is_refused(tokenizer, tmp_path):
    tok = hf.hf_tokenizer(tokenizer)
    tok.add_special_tokens(["<|im_start|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(hf.HFError, match="added tokens"):
        hf.tokenizer_from_hf(str(tmp_path / "tokenizer.json"))


# -----------------------------------------------------------------------------
# A registered architecture with a mapping of its own (tests/test_third_architecture.py), or without one


@pytest.fixture
def llama(monkeypatch):
    from tests import test_third_architecture as third

    monkeypatch.setitem(MODEL_TYPES, "llama", third.SPEC)
    return third.Llama


def test_a_third_architecture_exports_and_imports_through_its_mapping(llama, tokenizer, base_dir, tmp_path):
    model = tiny_model("llama", tokenizer.get_vocab_size(), max_seq_len=SEQ, head_dim=16)
    hf.export(model, tokenizer, str(tmp_path / "out"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    hf.import_dir(str(tmp_path / "out"), "imported")  # transformers' `llama` -> the architecture that maps it
    imported, _, meta = load_model("base", model_tag="imported")
    assert meta["model_type"] == "llama" and type(imported) is llama
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(idx) - theirs(idx).logits).abs().max() < 1e-4
        assert torch.equal(model(idx), imported(idx))


def test_export_refuses_an_architecture_without_mapping(llama, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_TYPES, "llama", dataclasses.replace(MODEL_TYPES["llama"], hf=None))
    model = tiny_model("llama", tokenizer.get_vocab_size(), max_seq_len=SEQ, head_dim=16)
    with pytest.raises(hf.HFError, match="'llama' architecture has no transformers mapping .*so it cannot be "
                                         "exported; architectures that can: gpt -> 'nanochat', alcoholic -> 'qwen3'"):
        hf.export(model, tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Scripts


def test_scripts_export_then_import(tokenizer, base_dir, tmp_path, capsys):
    from scripts import export_hf, import_hf

    tokenizer.save(str(base_dir / "tokenizer"))
    model = make_model("alcoholic", tokenizer.get_vocab_size())
    save_checkpoint(str(base_dir / "base_checkpoints" / "alcoholic_d2"), 5, model,
                    {"tokenizer_hash": tokenizer.hash, "metrics": {"val_bpb": 2.0}})
    out_dir = str(tmp_path / "out")
    export_hf.main(["--source=base", "--model_tag=alcoholic_d2", f"--out_dir={out_dir}"])
    import_hf.main([f"--hf_dir={out_dir}", "--model_tag=back", "--source=sft"])
    back, _, _ = load_model("sft", model_tag="back")
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(idx) - back(idx)).abs().max() < 1e-5
    # user errors: one line on stderr, exit status 1
    for main, argv in ((export_hf.main, ["--source=base", "--model_tag=alcoholic_d2", f"--out_dir={out_dir}"]),
                       (import_hf.main, [f"--hf_dir={tmp_path / 'nothing'}", "--model_tag=x"])):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: main(argv))
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
