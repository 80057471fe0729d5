import json
import os

import pytest
import torch

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_largest_model_tag,
    find_last_step,
    list_model_tags,
    load_model,
    load_rank_state,
    rank_state_path,
    read_meta,
    record_metrics,
    save_checkpoint,
    save_rank_state,
)
from nanochat.models import MODEL_TYPES
from nanochat.tokenizer import get_tokenizer
from tests.conftest import tiny_model

TYPES = list(MODEL_TYPES)


def make_model(model_type, depth=2):
    """Perturbed weights (no zero-initialised projection), so that a wrong load would show; 512 = the vocabulary of
    base_env's tokenizer."""
    return tiny_model(model_type, 512, depth=depth)


def save(model, tag, step=5, source="base", rank_state=None):
    meta = {"tokenizer_hash": get_tokenizer().hash, "train_args": {"depth": model.config.n_layer}}
    d = checkpoint_dir(source, tag)
    save_checkpoint(d, step, model, meta, rank_state=rank_state)
    return d


@pytest.mark.parametrize("model_type", TYPES)
def test_roundtrip_picks_class_from_meta(base_env, model_type):
    model = make_model(model_type)
    d = save(model, f"{model_type}_d2", rank_state={"x": torch.arange(3)})
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.safetensors", "optim_000005_rank0.pt"]
    loaded, tokenizer, meta = load_model("base", model_tag=f"{model_type}_d2")  # no model_type given
    assert type(loaded) is type(model) and meta["model_type"] == model_type and meta["step"] == 5
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(model.eval()(idx), loaded(idx))
    assert not loaded.training


def test_wrong_model_type_is_a_clear_error(base_env):
    d = save(make_model("alcoholic"), "alcoholic_d2")
    with pytest.raises(CheckpointError) as e:
        load_model("base", model_tag="alcoholic_d2", model_type="gpt")
    msg = str(e.value)
    assert "'alcoholic'" in msg and "--model_type=gpt" in msg and d in msg and "--model_type=alcoholic" in msg


def test_largest_tag_per_type(base_env):
    save(make_model("gpt", depth=1), "gpt_d1")
    save(make_model("gpt", depth=2), "gpt_d2")
    save(make_model("alcoholic", depth=1), "alcoholic_d1")
    assert list_model_tags("base") == ["alcoholic_d1", "gpt_d1", "gpt_d2"]
    assert find_largest_model_tag("base") == "gpt_d2"
    assert find_largest_model_tag("base", "alcoholic") == "alcoholic_d1"
    model, _, meta = load_model("base", model_type="alcoholic")
    assert meta["model_tag"] == "alcoholic_d1" and model.model_type == "alcoholic"
    with pytest.raises(CheckpointError, match="no gpt checkpoint"):
        find_largest_model_tag("sft", "gpt")


def test_incomplete_step_is_ignored(base_env):
    model = make_model("gpt")
    d = save(model, "t", step=3)
    save(model, "t", step=6)
    os.remove(os.path.join(d, "meta_000006.json"))  # as if the process died before writing meta
    assert find_last_step(d) == 3
    _, _, meta = load_model("base", model_tag="t")
    assert meta["step"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_weights_are_reported_not_loaded(base_env, damage):
    d = save(make_model("gpt"), "t")
    path = os.path.join(d, "model_000005.safetensors")
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated") as e:
        load_model("base", model_tag="t")
    assert path in str(e.value)


def test_invalid_safetensors_without_hash(base_env):
    d = save(make_model("gpt"), "t")
    meta_path = os.path.join(d, "meta_000005.json")
    meta = json.load(open(meta_path))
    del meta["model_sha256"]
    json.dump(meta, open(meta_path, "w"))
    path = os.path.join(d, "model_000005.safetensors")
    open(path, "wb").write(open(path, "rb").read()[:50])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model("base", model_tag="t")


def test_config_keys_mismatch(base_env):
    d = save(make_model("gpt", depth=2), "t")
    meta_path = os.path.join(d, "meta_000005.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["n_layer"] = 3
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError) as e:
        load_model("base", model_tag="t")
    assert "missing" in str(e.value) and "transformer.h.2" in str(e.value) and d in str(e.value)


def test_tokenizer_hash_mismatch(base_env):
    d = save(make_model("gpt"), "t")
    meta_path = os.path.join(d, "meta_000005.json")
    meta = json.load(open(meta_path))
    meta["tokenizer_hash"] = "0" * 64
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="tokenizer 000000000000"):
        load_model("base", model_tag="t")


def test_record_metrics_merges(base_env):
    d = save(make_model("gpt"), "t")
    record_metrics("base", "t", None, {"core": 0.1})
    record_metrics("base", "t", 5, {"arc": 0.3})
    assert read_meta(d, 5)["metrics"] == {"core": 0.1, "arc": 0.3}


def test_missing_tag_lists_available(base_env):
    save(make_model("gpt"), "gpt_d2")
    with pytest.raises(CheckpointError, match="available under .*: gpt_d2"):
        load_model("base", model_tag="nope")


def test_resolve_source_prefers_most_trained_stage(base_env):
    from nanochat.checkpoint import resolve_source

    with pytest.raises(CheckpointError, match="no checkpoints under"):
        resolve_source(None)
    save(make_model("gpt"), "gpt_d2", source="base")
    assert resolve_source(None) == "base" and resolve_source("sft") == "sft"
    save(make_model("alcoholic"), "alcoholic_d2", source="sft")
    assert resolve_source(None) == "sft" and resolve_source(None, model_type="gpt") == "base"


# -----------------------------------------------------------------------------
# Rank state: torch.save, torch.load(weights_only=True), exact round trip


def assert_identical(a, b, path="state"):
    """Same types, same values, tensors bit for bit (dtype and shape included)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path  # nan
    else:
        assert a == b, path


def round_trip(tmp_path, state):
    save_rank_state(rank_state_path(str(tmp_path), 5), state)
    return load_rank_state(str(tmp_path), 5)


def trained_rank_state(model_type, muon_variant="nanochat"):
    """The rank state of a model after two optimizer steps: AdamW moments and step counts, Muon momentum (and
    NorMuon second-moment) buffers, a dataloader position and RNG states."""
    model = make_model(model_type, depth=1)
    optimizers = model.setup_optimizers(muon_variant=muon_variant)
    for _ in range(2):
        idx = torch.randint(0, 512, (2, 16))
        model(idx, idx).backward()
        for opt in optimizers:
            opt.step()
    return {"optimizers": [opt.state_dict() for opt in optimizers],
            "dataloader": {"epoch": 1, "prev_pos": None, "cur_pos": [0, 3], "buffer": [5, 6, 7]},
            "rng": {"torch": torch.get_rng_state(), "cuda": [torch.get_rng_state()]}}


@pytest.mark.parametrize("muon_variant", ["classic", "nanochat"])
@pytest.mark.parametrize("model_type", TYPES)
def test_rank_state_round_trip_is_exact(tmp_path, model_type, muon_variant):
    state = trained_rank_state(model_type, muon_variant)
    assert any(isinstance(k, int) for k in state["optimizers"][0]["state"])  # int keys survive as ints
    muon_state = next(iter(state["optimizers"][1]["state"].values()))
    assert ("second_moment" in muon_state) == (muon_variant == "nanochat")
    assert_identical(state, round_trip(tmp_path, state))


def test_rank_state_round_trip_edge_cases(tmp_path):
    shared = torch.arange(6.0)
    state = {"floats": [float("nan"), float("inf"), -float("inf"), 0.1, -0.0], "tuple": (1, (2, "x"), None),
             "int_keys": {0: "a", 1: {True: 2}}, "__tensor__": "a plain key that looks like a tag",
             "tensors": [torch.zeros(0), torch.tensor(3), torch.ones(2, 3, dtype=torch.bfloat16), shared, shared[2:4]],
             "empty": {}, "nested": [[{"deep": [torch.tensor([True, False])]}]]}
    assert_identical(state, round_trip(tmp_path, state))


def test_rank_state_that_would_not_load_is_refused_at_save(tmp_path):
    """What torch.load(weights_only=True) refuses (here a numpy scalar) fails the save, not a later --resume."""
    import numpy as np

    with pytest.raises(TypeError, match="not numpy"):
        save_rank_state(rank_state_path(str(tmp_path), 5), {"dataloader": {"epoch": np.int64(1)}})
    assert os.listdir(tmp_path) == []  # no file, no temp file
