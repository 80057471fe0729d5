"""Hostile files and names: sizes a checkpoint or a transformers config declares (bounded before anything is
allocated, judged by the peak memory of a fresh process), non-finite architecture values (refused from flags, code
and meta, for any registered architecture), special files in place of the files the project reads (a FIFO, a
device, a directory: an error, never a hang) and names that are paths (tags, index entries: nothing is written or
read outside the base directory or --hf_dir). See docs/reliability.md ("Limits")."""

import ast
import json
import os
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.checkpoint import CheckpointError, checkpoint_dir, list_steps, load_model, load_rank_state
from nanochat.config import ConfigError, TrainConfig
from nanochat.dataloader import DataLoader
from nanochat.limits import MAX_SEQUENCE_LEN, ROTARY_PRECOMPUTED
from nanochat.models import MODEL_TYPES, build_model, config_from_depth, config_from_dict
from nanochat.models.alcoholic import AlcoholicNanoConfig
from nanochat.tokenizer import TokenizerError, get_token_bytes, get_tokenizer
from scripts import base_train, chat_cli, chat_web, compare, export_hf, import_hf
from tests.conftest import tiny_model
from tests.reliability.hostile import HANG, REPO, cli_error, edit_meta, own_tokenizer, run_measured, save_tiny, within

TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=64", "--sample_every=-1"]
MiB = 1 << 20

# -----------------------------------------------------------------------------
# Declared sizes: bounded before anything is allocated


def test_a_huge_context_in_meta_costs_no_memory(base_env):
    """A meta declaring sequence_len=1,000,000 (no weight's shape constrains it) used to build rotary tables of 10M
    positions on every load (~1.3 GB here, 10 GB at head_dim 128). Now: refused in one line, and the process peaks
    no higher than one loading the same weights honestly; at the limit, the tables are capped and it loads."""
    for tag, seq in (("honest", None), ("hostile", 1_000_000), ("at_limit", MAX_SEQUENCE_LEN)):
        d = save_tiny(tag=tag)
        if seq:
            edit_meta(d, sequence_len=seq)
    env = {"NANOCHAT_BASE_DIR": str(base_env), "OMP_NUM_THREADS": "1"}
    runs = {tag: run_measured(["scripts.chat_cli", "-i", "base", "-g", tag, "-p", "Hi", "-m", "2", "-t", "0",
                               "--device_type=cpu"], env) for tag in ("honest", "hostile", "at_limit")}
    assert runs["honest"][0] == 0 and runs["at_limit"][0] == 0, runs
    status, _, err, peak = runs["hostile"]
    assert status == 1 and err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert "sequence_len=1,000,000 is larger than 131,072" in err
    honest = runs["honest"][3]
    peaks = {k: v[3] // MiB for k, v in runs.items()}  # MiB; before the fix the hostile one peaked at 2.8 GiB
    assert peak < honest + 64 * MiB and runs["at_limit"][3] < honest + 64 * MiB, peaks


SIZES = [("sequence_len", 10**7), ("n_layer", 10**6), ("n_embd", 10**8), ("n_head", 10**6), ("n_kv_head", 10**6),
         ("vocab_size", 10**9)]


@pytest.mark.parametrize("field, value", SIZES, ids=[f for f, _ in SIZES])
def test_declared_sizes_beyond_the_limits_are_one_line_before_anything_is_built(base_env, field, value):
    d = save_tiny()
    edit_meta(d, **{field: value})
    with pytest.raises(CheckpointError) as e:
        within(HANG, load_model, "base", None, "eval", "t")
    assert f"{field}={value:,} is larger than" in str(e.value) and "\n" not in str(e.value)


def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(base_env):
    """Within every size limit, but ~1 TB of weights: the memory check refuses it before allocation."""
    status, _, err, peak = run_measured(["scripts.base_train", *TINY, "--n_embd=131072", "--head_dim=128",
                                         "--num_iterations=1"], {"NANOCHAT_BASE_DIR": str(base_env)})
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "GiB for its weights alone, more than the" in err
    assert peak < 2 << 30  # the weights alone would be ~800 GiB


def test_rotary_tables_are_capped_and_grow_on_demand():
    model = tiny_model("gpt", 64, max_seq_len=MAX_SEQUENCE_LEN, head_dim=32)
    assert model.rotary.cos.size(1) == ROTARY_PRECOMPUTED  # not 10 x 131,072
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 10x the context: no warning
        model.make_kv_cache(1, ROTARY_PRECOMPUTED + 10)
    assert model.rotary.cos.size(1) >= ROTARY_PRECOMPUTED + 10
    small = tiny_model("gpt", 64, max_seq_len=32, head_dim=32)
    assert small.rotary.cos.size(1) == 320  # 10 x the context, as before


def test_hf_config_declaring_huge_sizes_is_one_line(base_env, tmp_path, capsys):
    pytest.importorskip("transformers")
    from nanochat import hf

    out = str(tmp_path / "hf")
    hf.export(tiny_model("alcoholic", get_tokenizer().get_vocab_size(), max_seq_len=32, head_dim=32),
              get_tokenizer(), out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    for key, value, message in (("max_position_embeddings", 1_000_000, "sequence_len=1,000,000 is larger than"),
                                ("hidden_size", 10**8, "n_embd=100,000,000 is larger than"),
                                ("vocab_size", 10**9, "vocab_size=1,000,000,000 is larger than"),
                                ("rope_theta", float("inf"), "rope_theta=inf must be a finite number")):
        broken = dict(config, **{key: value})
        if key == "rope_theta":
            broken["rope_parameters"] = dict(config["rope_parameters"], rope_theta=value)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(broken, f)
        line = cli_error(capsys, import_hf.main, [f"--hf_dir={out}", f"--model_tag=h_{key}"], 1)
        assert message in line, line
    assert not os.path.exists(checkpoint_dir("base", "h_rope_theta"))


# -----------------------------------------------------------------------------
# Non-finite architecture values: flags, code, meta, any registered architecture


@pytest.fixture
def llama(monkeypatch):
    """The third architecture of tests/test_third_architecture.py: a config with no checks of its own."""
    from tests import test_third_architecture as third

    monkeypatch.setitem(MODEL_TYPES, "llama", third.SPEC)
    return third


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_architecture_floats_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, llama, value):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for model_type, name in (("alcoholic", "rope_theta"), ("alcoholic", "norm_eps"), ("alcoholic", "logit_softcap"),
                             ("alcoholic", "dropout"), ("llama", "rope_theta")):
        argv = [f"--model_type={model_type}", f"--{name}={value}"]
        line = cli_error(capsys, base_train.main, argv, 2)
        assert "is not a finite number" in line, line
    assert os.listdir(tmp_path) == []


def test_non_finite_architecture_floats_are_refused_from_code(llama):
    with pytest.raises(ValueError, match="rope_theta=inf must be a finite number > 0"):
        AlcoholicNanoConfig(rope_theta=float("inf"))
    with pytest.raises(ValueError, match="norm_eps=nan must be a finite number > 0"):
        AlcoholicNanoConfig(norm_eps=float("nan"))
    # an architecture without checks of its own gets the registry's
    config = llama.LlamaConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,
                               ffn_hidden=96, rope_theta=float("inf"))
    with pytest.raises(ValueError, match="llama config: rope_theta=inf is not a finite number"):
        build_model("llama", config)
    with pytest.raises(ValueError, match="llama config: rope_theta=nan is not a finite number"):
        config_from_dict("llama", dict(vars(config), rope_theta=float("nan")))
    with pytest.raises(ValueError, match="llama config: sequence_len=1,000,000 is larger than 131,072"):
        config_from_depth("llama", 1, 1_000_000, 64)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "abc", -1.0])
def test_a_saved_non_finite_rope_theta_is_refused_on_load(base_env, capsys, value):
    d = save_tiny("alcoholic")
    edit_meta(d, rope_theta=value)  # json writes inf and nan as Infinity and NaN, which it reads back
    line = cli_error(capsys, chat_cli.main, ["-i", "base", "-g", "t", "-p", "Hi", "--device_type=cpu"], 1)
    assert "rope_theta" in line and d in line, line


# -----------------------------------------------------------------------------
# Special files: a FIFO, a device or a directory in place of a file is an error, never a hang


def fifo(path):
    if os.path.lexists(path):
        os.remove(path)
    os.mkfifo(path)
    return path


def test_a_fifo_data_shard_is_skipped_with_a_warning_not_a_hang(base_env, capsys):
    """The shards of the embedded corpus in base_data, the first replaced by a FIFO: base_train trains on the
    others and says which shard it skipped and why."""
    data = base_env / "base_data"
    data.mkdir()
    for name in sorted(os.listdir(base_env / "embedded_data")):
        if name.endswith(".parquet"):
            os.symlink(base_env / "embedded_data" / name, data / name)
    fifo(data / "shard_00000.parquet")  # the first training shard: read at once
    capsys.readouterr()
    result = within(120, base_train.main, [*TINY, "--num_iterations=2", "--model_tag=f"])
    assert result["step"] == 2
    out = capsys.readouterr().out
    assert "skipping shard" in out and "shard_00000.parquet" in out and "a FIFO (named pipe), not a regular file" in out


def test_a_fifo_among_shards_is_skipped_by_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    for i in (0, 2):
        pq.write_table(pa.table({"text": [f"doc {i} {k} of some words" for k in range(20)]}),
                       tmp_path / "base_data" / f"shard_0000{i}.parquet")
    fifo(tmp_path / "base_data" / "shard_00001.parquet")
    from nanochat.tokenizer import RustBPETokenizer

    tok = RustBPETokenizer.train_from_iterator(["doc of some words"] * 10, 280)
    loader = DataLoader(2, 8, "train", tokenizer=tok, rank=0, world_size=1)
    within(HANG, lambda: [next(loader) for _ in range(5)])


@pytest.mark.parametrize("name", ["tokenizer.json", "token_bytes.pt"])
@pytest.mark.parametrize("kind", ["fifo", "char device", "directory"])
def test_special_tokenizer_files_are_one_line_errors(base_env, name, kind):
    path = own_tokenizer(base_env) / name
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char device":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    load = get_tokenizer if name == "tokenizer.json" else get_token_bytes
    with pytest.raises(TokenizerError) as e:
        within(HANG, load)
    what = {"fifo": "a FIFO (named pipe)", "char device": "a character device", "directory": "a directory"}[kind]
    assert f"{path} is {what}, not a regular file" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["meta_000005.json", "model_000005.safetensors", "optim_000005_rank0.pt"])
def test_special_checkpoint_files_are_one_line_errors(base_env, name):
    d = save_tiny()
    open(os.path.join(d, "optim_000005_rank0.pt"), "wb").close()
    fifo(os.path.join(d, name))
    load = (lambda: load_rank_state(d, 5)) if name.startswith("optim") else (lambda: load_model("base", model_tag="t"))
    with pytest.raises(CheckpointError, match="is a FIFO \\(named pipe\\), not a regular file") as e:
        within(HANG, load)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors.index.json", "shard"])
def test_special_files_in_an_hf_directory_are_one_line_errors(base_env, tmp_path, capsys, name):
    pytest.importorskip("transformers")
    from nanochat import hf

    out = tmp_path / "hf"
    hf.export(tiny_model("gpt", get_tokenizer().get_vocab_size(), max_seq_len=32, head_dim=32), get_tokenizer(),
              str(out))
    if name in ("model.safetensors.index.json", "shard"):  # a sharded layout: the index names the shard
        os.rename(out / "model.safetensors", out / "model-00001-of-00001.safetensors")
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}, f)
        name = "model-00001-of-00001.safetensors" if name == "shard" else name
    fifo(out / name)
    line = cli_error(capsys, import_hf.main, [f"--hf_dir={out}", "--model_tag=x"], 1)
    assert f"{out / name} is a FIFO (named pipe), not a regular file" in line, line


def readers_outside_fileio():
    """Calls in nanochat/, scripts/ and tasks/ that read a file without fileio.open_regular/check_regular: builtin
    open() for reading, and the library readers that take a path (pyarrow, safetensors, gzip, torch.load), unless
    their argument comes from open_regular/check_regular in the same function. Kernel interfaces (/proc, /sys,
    cgroup files) are read with open() in the functions listed here."""
    kernel = {("nanochat/dist.py", "_meminfo_available"), ("nanochat/plan.py", "current_rss"),
              ("nanochat/mfu.py", "cpu_name"), ("nanochat/execution.py", "sandbox_uids"),
              ("nanochat/execution.py", "_oom_killed"), ("nanochat/sandbox.py", "cgroup_homes"),
              ("nanochat/sandbox.py", "_remove_cgroups"), ("nanochat/execution_prelude.py", "drop_root")}
    readers = {("pq", "ParquetFile"), ("pq", "read_table"), (None, "load_file"), (None, "safe_open"),
               ("torch", "load"), ("gzip", "open")}
    offenders = []
    for top in ("nanochat", "scripts", "tasks"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in (f for f in files if f.endswith(".py")):
                rel = os.path.relpath(os.path.join(root, name), REPO)
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                    safe = {t.id for n in ast.walk(fn) for t, v in _bindings(n) if _is_regular(v)}
                    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                        what = _unsafe_read(call, readers, safe)
                        if what and (rel, fn.name) not in kernel and rel != "nanochat/fileio.py":
                            offenders.append(f"{rel}:{call.lineno} {what} in {fn.name}")
    return offenders


def _bindings(node):
    if isinstance(node, ast.Assign):
        return [(t, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return [(i.optional_vars, i.context_expr) for i in node.items if isinstance(i.optional_vars, ast.Name)]
    return []


def _is_regular(value):
    return isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) in (
        "open_regular", "check_regular")


def _unsafe_read(call, readers, safe):
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    owner = getattr(func.value, "id", None) if isinstance(func, ast.Attribute) else None
    if name == "open" and owner is None:  # builtin open(): reading unless its mode writes
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")
        return None if writes else "open() for reading"
    if (owner, name) not in readers:
        return None
    arg = call.args[0] if call.args else None
    if _is_regular(arg) or (isinstance(arg, ast.Name) and arg.id in safe):
        return None
    return f"{owner + '.' if owner else ''}{name}() on a path"


def test_every_file_read_goes_through_fileio():
    assert readers_outside_fileio() == []


# -----------------------------------------------------------------------------
# Names, not paths: a tag never leads outside the base directory, an index never outside --hf_dir

NOT_NAMES = ["../../escape", "/tmp/escape_abs", "a/b", "..", "a\\b", "x\x01y", "x\ny"]
TAG_FLAGS = {"base_train": (base_train.main, ["--model_tag={}"]),
             "chat_cli": (chat_cli.main, ["-g", "{}", "-p", "Hi"]),
             "chat_web": (chat_web.main, ["-g", "{}"]),
             "import_hf": (import_hf.main, ["--hf_dir=x", "--model_tag={}"]),
             "export_hf": (export_hf.main, ["-g", "{}", "--out_dir=x"]),
             "compare": (compare.main, ["--tag_prefix={}"]),
             "compare tags": (compare.main, ["--model_tags", "{}"])}


@pytest.mark.parametrize("script", list(TAG_FLAGS))
def test_tags_are_names_not_paths(tmp_path, monkeypatch, capsys, script):
    base = tmp_path / "a" / "b" / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.chdir(tmp_path)
    main, argv = TAG_FLAGS[script]
    for tag in NOT_NAMES:
        line = cli_error(capsys, main, [a.replace("{}", tag) for a in argv], 2)
        assert "is not a name" in line or "is not '' (the default) or a name" in line, line
    assert not [p for p in tmp_path.rglob("*escape*")]


def test_a_tag_that_is_a_path_writes_nothing_outside_the_base_dir(base_env, tmp_path, capsys):
    line = cli_error(capsys, base_train.main, [*TINY, "--num_iterations=1", "--model_tag=../../escape"], 2)
    assert "--model_tag: '../../escape' is not '' (the default) or a name" in line
    assert not [p for p in tmp_path.rglob("escape")] and not os.path.exists(base_env.parent.parent / "escape")
    # from code too: the config and the checkpoint layer refuse it
    with pytest.raises(ConfigError, match="is not '' \\(the default\\) or a name"):
        TrainConfig(model_tag="../x")
    with pytest.raises(CheckpointError, match="model tag '../x' is not a name"):
        checkpoint_dir("base", "../x")


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors", 7, ["x"]])
def test_an_hf_index_names_only_files_inside_its_directory(base_env, tmp_path, capsys, entry):
    pytest.importorskip("transformers")
    from nanochat import hf

    out = tmp_path / "hf"
    hf.export(tiny_model("gpt", get_tokenizer().get_vocab_size(), max_seq_len=32, head_dim=32), get_tokenizer(),
              str(out))
    os.rename(out / "model.safetensors", tmp_path / "outside.safetensors")  # valid weights, outside --hf_dir
    entry = str(tmp_path / "outside.safetensors") if entry == "ABSOLUTE" else entry
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": entry}}, f)
    line = cli_error(capsys, import_hf.main, [f"--hf_dir={out}", "--model_tag=x"], 1)
    assert "which is not a file inside" in line and "an index may only name files in its own directory" in line
    assert list_steps(checkpoint_dir("base", "x")) == []
