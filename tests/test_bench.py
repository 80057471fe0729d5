"""scripts.bench: every subcommand runs at tiny shapes and writes its JSON, with ratio = ours / peer."""

import json
import os

import pytest

from nanochat.bench import memory as bench_memory
from nanochat.models import MODEL_TYPES, presets
from scripts import bench
from tests.conftest import tiny_model

TINY = ["--depth=1", "--head_dim=32", "--vocab_size=64", "--n=1"]


def read(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def assert_comparison(entry):
    assert entry["peer"] is not None and set(entry["ratio"]) == set(entry["ours"]) & set(entry["peer"])
    for k, ratio in entry["ratio"].items():
        assert ratio == pytest.approx(entry["ours"][k] / entry["peer"][k])


def test_params_lists_every_preset(tmp_path):
    bench.main(["params", "--depths", "2", f"--out={tmp_path}"])
    data = read(tmp_path, "params")
    assert all(f"{name} (preset)" in data for name in presets())
    assert all(data[f"{t} d2"]["total"] > 0 and data[f"{t} d2"]["flops"] > 0 for t in MODEL_TYPES)


def test_data_times_the_preparation_of_own_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # bench data leaves it untouched
    text = tmp_path / "own.txt"
    text.write_text("\n\n\n".join(f"document {i}: " + "the river and the stone " * (5 + i % 7) for i in range(400)))
    bench.main(["data", f"--data={text}", "--seconds=0.05", f"--out={tmp_path}"])
    data = read(tmp_path, "data")
    prepare = data["prepare"]
    assert prepare["bytes"] == text.stat().st_size and prepare["documents"] == 400
    assert prepare["mb_per_s"] == pytest.approx(prepare["bytes"] / prepare["seconds"] / 1e6)
    assert prepare["tok_per_s_4096"] > prepare["mb_per_s"] * 1e6 / 8  # tokens of at most 8 bytes on average
    assert len(data["loader_tok_s"]) == 4 and all(row["vocab_4096"] > 0 for row in data["loader_tok_s"])
    assert "prepared again (unchanged: hashing only)" in capsys.readouterr().out
    assert not (tmp_path / "base").exists()


def test_train_compares_with_the_transformers_twin(tmp_path):
    pytest.importorskip("transformers")
    bench.main(["train", *TINY, "--seq_len=16", "--batch_size=2", "--profile", f"--out={tmp_path}"])
    data = read(tmp_path, "train")
    assert data["shapes"] == dict(depth=1, batch_size=2, seq_len=16, vocab_size=64, head_dim=32,
                                  activation_checkpointing=False, compile=False)
    for t in MODEL_TYPES:
        assert set(data[t]["ours"]) == {"fwdbwd_tok_s", "step_tok_s", "fwdbwd_ms", "step_ms", "optimizer_ms",
                                        "profiled_ms", "matmul_ms", "matmul_share"}
        assert_comparison(data[t])
        assert data[t]["loss_diff"] < 1e-4  # the same weights: the twin computes the same loss
        for side in ("ours", "peer"):
            f = data[t][side]
            assert 0 < f["optimizer_ms"] < f["step_ms"]  # timed inside the same step
            assert 0 < f["matmul_ms"] < f["profiled_ms"] and f["matmul_share"] == f["matmul_ms"] / f["profiled_ms"]


def test_decode_reports_prefill_and_per_token_time(tmp_path):
    pytest.importorskip("transformers")
    bench.main(["decode", *TINY, "--prompt_len=4", "--max_tokens=3", "--batch_sizes", "1", "2", f"--out={tmp_path}"])
    data = read(tmp_path, "decode")
    for t in MODEL_TYPES:
        assert data[t]["same_tokens"] is True  # greedy decoding of the same weights, with and without transformers
        for key in ("batch1", "batch2"):
            assert set(data[t][key]["ours"]) == {"ttft_ms", "tpot_ms", "tok_s"}
            assert_comparison(data[t][key])
        one = data[t]["batch1"]
        assert one["cache_speedup"] == pytest.approx(one["no_cache"]["tpot_ms"] / one["ours"]["tpot_ms"])
        assert "no_cache" not in data[t]["batch2"]


def test_infer_on_a_checkpoint(base_env, tmp_path):
    pytest.importorskip("transformers")
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    model = tiny_model("alcoholic", tokenizer.get_vocab_size())
    save_checkpoint(checkpoint_dir("base", "tiny"), 3, model, {"tokenizer_hash": tokenizer.hash})
    bench.main(["infer", "--model_tag=tiny", "--prompt_len=8", "--max_tokens=3", "--batch_sizes", "1", "2", "--n=1",
                f"--out={tmp_path}"])
    data = read(tmp_path, "infer")
    assert data["shapes"]["model_type"] == "alcoholic" and data["shapes"]["step"] == 3
    assert_comparison(data["alcoholic"]["batch2"])
    assert data["alcoholic"]["same_tokens"] is True


def check_memory(data, types):
    for key in types:
        e = data[key]
        assert e["ratio"] == pytest.approx(e["estimate"]["peak"] / e["measured"]["peak"])
        assert e["estimate"]["peak"] == e["estimate"]["held"] + e["estimate"]["baseline"]
        assert e["estimate"]["held"] >= e["estimate"]["tensors"] > 0
        assert e["measured"]["peak"] >= e["measured"]["baseline"] > 0


def test_memory_measures_and_estimates_every_type(tmp_path, monkeypatch):
    # the measurement itself, in this process (the real command runs it in a fresh one: the slow test below)
    monkeypatch.setattr(bench_memory, "measure_in_subprocess", bench_memory.training_memory)
    bench.main(["memory", *TINY, "--seq_len=16", "--batch_size=2", "--steps=1", "--activation_checkpointing=both",
                f"--out={tmp_path}"])
    data = read(tmp_path, "memory")
    check_memory(data, [t + suffix for t in MODEL_TYPES for suffix in ("", "+ckpt")])
    assert all(data[t + "+ckpt"]["activation_checkpointing"] and not data[t]["activation_checkpointing"]
               for t in MODEL_TYPES)


@pytest.mark.slow
def test_memory_in_fresh_processes(tmp_path):
    bench.main(["memory", *TINY, "--seq_len=16", "--batch_size=2", "--steps=1", f"--out={tmp_path}"])
    check_memory(read(tmp_path, "memory"), list(MODEL_TYPES))


def test_scaling_writes_json_and_plot(tmp_path):
    bench.main(["scaling", "--depths", "1", "2", "--head_dim=32", "--vocab_size=64", "--seq_len=16", "--batch_size=2",
                "--n=1", f"--out={tmp_path}"])
    data = read(tmp_path, "scaling")
    for t in MODEL_TYPES:
        assert data[t]["depth"] == [1, 2] and data[t]["flops_per_token"][0] < data[t]["flops_per_token"][1]
        assert len(data[t]["tok_s"]) == 2
    assert os.path.getsize(tmp_path / "scaling.png") > 0
    # without --head_dim every depth builds, odd ones too (width 320 at d5 has no whole number of 128-wide heads)
    bench.main(["scaling", "--depths", "5", "--vocab_size=64", "--seq_len=8", "--batch_size=1", "--n=1",
                f"--out={tmp_path}"])
    assert read(tmp_path, "scaling")["shapes"]["head_dim"] == 64
