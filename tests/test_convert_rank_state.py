"""Checkpoints of format 2 (rank state in optim_*.safetensors, its tree as JSON in the metadata): weights and meta load
as before, --resume is refused with the conversion command, and dev/convert_rank_state.py makes them resume exactly."""

import json
import math
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from dev.convert_rank_state import convert_dir, main
from nanochat.checkpoint import CheckpointError, checkpoint_dir, load_model, load_rank_state, save_checkpoint
from nanochat.cli import run_cli
from nanochat.tokenizer import get_tokenizer
from tests.conftest import tiny_model
from tests.test_checkpoint import assert_identical, trained_rank_state

TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=64", "--sample_every=-1"]


def encode_format2(state):
    """A format-2 rank state file (bytes), as nanochat wrote it before format 3: tensors keyed by their path in the
    state, and the rest of the state as JSON in the metadata, with __tensor__/__tuple__/__float__/__dict__ tags."""
    tensors = {}

    def encode(obj, path):
        if isinstance(obj, torch.Tensor):
            key = "/".join(path) or "root"
            tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared memory
            return {"__tensor__": key}
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if isinstance(obj, (list, tuple)):
            items = [encode(v, path + [str(i)]) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else {"__tuple__": items}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: encode(v, path + [k]) for k, v in obj.items()}
            return {"__dict__": [[encode(k, path + ["key"]), encode(v, path + [str(k)])] for k, v in obj.items()]}
        return obj

    tree = encode(state, [])
    return safetensors_save(tensors, metadata={"format": "nanochat-rank-state", "version": "1",
                                               "state": json.dumps(tree, allow_nan=False)})


def make_format2(d, step):
    """Turn step `step` of folder d into what the previous version wrote: optim_*.safetensors, format_version 2."""
    pt = os.path.join(d, f"optim_{step:06d}_rank0.pt")
    state = load_rank_state(d, step)
    with open(pt.removesuffix(".pt") + ".safetensors", "wb") as f:
        f.write(encode_format2(state))
    os.remove(pt)
    meta_path = os.path.join(d, f"meta_{step:06d}.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump(dict(meta, format_version=2), f)
    return state


def test_format2_loads_weights_refuses_resume_and_converts_exactly(base_env):
    model = tiny_model("gpt", 512, depth=1)
    d = checkpoint_dir("base", "old")
    state = trained_rank_state("alcoholic")
    state["extra"] = {"floats": [float("nan"), -float("inf")], "tuple": (1, (2, "x")), "int_keys": {0: {True: 2}}}
    save_checkpoint(d, 5, model, {"tokenizer_hash": get_tokenizer().hash}, rank_state=state)
    make_format2(d, 5)
    loaded, _, meta = load_model("base", model_tag="old")  # eval, chat and fine-tuning load this way
    assert meta["format_version"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="format-2 rank state") as e:
        load_rank_state(d, 5)
    assert f"python -m dev.convert_rank_state {d}" in str(e.value) and "\n" not in str(e.value)
    assert convert_dir(d) == [os.path.join(d, "optim_000005_rank0.pt")]
    assert_identical(state, load_rank_state(d, 5))
    assert convert_dir(d) == []  # already converted: skipped
    with open(os.path.join(d, "meta_000005.json")) as f:
        assert json.load(f)["format_version"] == 2  # nothing else is changed


def test_converted_checkpoint_resumes_bitwise(base_env, capsys):
    """A run saved at steps 2 and 4; step 2 turned into format 2 and step 4 dropped: --resume is refused, and after
    the conversion it recomputes step 4 bit for bit."""
    from scripts import base_train

    base_train.main([*TINY, "--num_iterations=4", "--save_every=2", "--model_tag=c"])
    d = checkpoint_dir("base", "c")
    reference = load_file(os.path.join(d, "model_000004.safetensors"))
    os.remove(os.path.join(d, "meta_000004.json"))
    make_format2(d, 2)
    resume = [*TINY, "--num_iterations=4", "--save_every=2", "--model_tag=c", "--resume"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(lambda: base_train.main(resume))
    assert f"python -m dev.convert_rank_state {d}" in capsys.readouterr().err
    main([d])
    base_train.main(resume)
    resumed = load_file(os.path.join(d, "model_000004.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("content", [
    "pickle", "foreign format", "missing tensor", "bad float", "not JSON", "truncated"])
def test_damaged_format2_file_is_a_one_line_error(tmp_path, capsys, content):
    marker = tmp_path / "pwned"

    class Plant:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    good = encode_format2({"t": torch.ones(64)})
    data = {"pickle": pickle.dumps(Plant()),
            "foreign format": safetensors_save({}, metadata={"format": "other", "version": "1", "state": "{}"}),
            "missing tensor": safetensors_save({}, metadata={"format": "nanochat-rank-state", "version": "1",
                                                              "state": '{"t": {"__tensor__": "t"}}'}),
            "bad float": safetensors_save({}, metadata={"format": "nanochat-rank-state", "version": "1",
                                                         "state": '{"x": {"__float__": "1e999"}}'}),
            "not JSON": safetensors_save({}, metadata={"format": "nanochat-rank-state", "version": "1", "state": "{"}),
            "truncated": good[:-50]}[content]
    (tmp_path / "optim_000001_rank0.safetensors").write_bytes(data)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "optim_000001_rank0.safetensors" in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["optim_000001_rank0.safetensors"] and not marker.exists()
