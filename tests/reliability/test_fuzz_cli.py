"""Every flag of every script, given nan, inf, -1, 0, "", 1e30 and a path with '..': each run exits non-zero with one
line on stderr and no traceback, or runs correctly. The scripts are listed from scripts/ (plus the module entry points
in MODULES) and their flags read from their --help, so a new script or flag is fuzzed with no edit here.

Runs are in-process (main(argv) through cli.run_cli, as `python -m` runs it) against a fake base dir (the embedded
shards and a tokenizer, no checkpoint): a value is refused while parsing (exit status 2), or the run goes on until the
first heavy work (a model's weights allocated, a tokenizer trained, a subprocess, a download, a server started), which
counts as running correctly, or until it ends: a one-line error (no checkpoint, ...) or exit status 0. Nothing named
'escape' may appear outside the base directory.
`test_every_script_runs_its_main_through_run_cli` checks what only the command line would show: that each script's
`__main__` block turns a UserError into one line."""

import ast
import importlib
import os
import re
import subprocess

import pytest
import torch

from nanochat.cli import run_cli
from tests.reliability.hostile import HANG, REPO, within

VALUES = ["nan", "inf", "-1", "0", "", "1e30", "../../escape"]
MODULES = ["nanochat.dataset"]  # entry points outside scripts/ (python -m nanochat.dataset)
SCRIPTS = sorted(f"scripts.{name[:-3]}" for name in os.listdir(os.path.join(REPO, "scripts"))
                 if name.endswith(".py") and name != "__init__.py") + MODULES
REQUIRED = {"out_dir": "{tmp}/out", "hf_dir": "{tmp}/hf", "model_tag": "fuzz"}  # values for required flags
SLOW = {"scripts.bench"}  # ~300 runs, ~10 s: the benchmarks are a developer's tool


class Stop(Exception):
    """Raised by the stubs where heavy work would begin: the run got there, which counts as running correctly."""


def help_text(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def top_level(usage):
    """The tokens outside [brackets] of a usage line: the required flags, and {a,b,c} of subcommands."""
    depth, out = 0, []
    for token in re.findall(r"[\[\]]|[^\s\[\]]+", usage):
        depth += {"[": 1, "]": -1}.get(token, 0)
        if depth == 0 and token not in "[]":
            out.append(token)
    return out


def flags_of(module, capsys):
    """[(subcommand argv, flag, required)] from the script's --help (and each subcommand's)."""
    main = importlib.import_module(module).main
    text = help_text(main, [], capsys)
    subcommands = [t for t in top_level(" ".join(text.split("\n\n")[0].split())) if t.startswith("{")]
    groups = [([sub], help_text(main, [sub], capsys)) for sub in subcommands[0].strip("{}").split(",")] \
        if subcommands else [([], text)]
    out = []
    for prefix, text in groups:
        usage = " ".join(text.split("\n\n")[0].split())
        options = re.findall(r"(?m)^\s+(?:(-\w+)(?: \S+)?, )?--(\w+)", text)
        required = {short or f"--{long}" for short, long in options} & set(top_level(usage))
        for short, flag in dict.fromkeys(options):
            if flag != "help":
                out.append((prefix, flag, (short or f"--{flag}") in required))
    assert out, f"no flags found in the --help of {module}"
    return out


def stub_heavy_work(monkeypatch):
    """Stop where heavy work begins (Stop); no network, no stdin."""
    import tiktoken
    import uvicorn

    from nanochat.tokenizer import RustBPETokenizer

    def stop(*args, **kwargs):
        raise Stop("heavy work")

    def no_input(*args):
        raise EOFError

    monkeypatch.setattr(torch.nn.Module, "to_empty", stop)  # a model's weights are about to be allocated
    monkeypatch.setattr(RustBPETokenizer, "train_from_iterator", classmethod(stop))
    monkeypatch.setattr(uvicorn.Server, "run", stop)
    monkeypatch.setattr(subprocess, "run", stop)  # compare's runs, bench memory's measurements
    monkeypatch.setattr("nanochat.dataset.download_file", stop)
    monkeypatch.setattr("nanochat.core_eval.download_file", stop)
    monkeypatch.setattr(tiktoken, "get_encoding", stop)  # tok_eval's references: a download
    monkeypatch.setattr("builtins.input", no_input)


def outcome(main, argv, capsys):
    """'stopped' (heavy work reached), 'ok' (ended with status 0), 'refused <status>: <line>' (exit status != 0 with
    exactly one line on stderr and no traceback; 2 is a refusal of the flags themselves)."""
    capsys.readouterr()
    try:
        within(HANG, run_cli, lambda: main(argv))
    except Stop:
        return "stopped"
    except SystemExit as e:
        err = capsys.readouterr().err
        if e.code in (0, None):
            return "ok"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"{argv}: exit {e.code} with stderr:\n{err[-3000:]}"
        return f"refused {e.code}: {lines[0]}"
    return "ok"


def fuzz(module, tmp_path, monkeypatch, capsys, probes=()):
    """{argv: outcome} of every flag of `module` given every value (and the probes)."""
    base = tmp_path / "a" / "b" / "base"
    base.mkdir(parents=True)
    prepared = os.environ["NANOCHAT_BASE_DIR"]
    for name in ("embedded_data", "tokenizer"):
        os.symlink(os.path.join(prepared, name), base / name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.chdir(base.parent)
    main = importlib.import_module(module).main
    flags = flags_of(module, capsys)
    results = {}
    stub_heavy_work(monkeypatch)
    if True:
        for prefix, flag, _ in flags:
            required = [f"--{f}={REQUIRED.get(f, 'fuzz').format(tmp=tmp_path)}" for p, f, req in flags
                        if req and p == prefix and f != flag]
            for value in [*VALUES, *probes]:
                argv = [*prefix, *required, f"--{flag}={value}"]
                results[" ".join(argv)] = outcome(main, argv, capsys)
                assert not (base.parent / "escape").exists() and not (base / "escape").exists(), argv
    return results


@pytest.fixture
def fuzz_base(prepared_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base_dir))


@pytest.mark.parametrize("module", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in SCRIPTS])
def test_every_flag_value_is_refused_in_one_line_or_runs_correctly(fuzz_base, tmp_path, monkeypatch, capsys, module):
    """A flag that refuses 'abc' while parsing (exit status 2) holds a typed value (a number, a choice, a boolean): it
    must refuse nan and inf there too, never let them reach the run."""
    results = fuzz(module, tmp_path, monkeypatch, capsys, probes=["abc"])
    typed = {argv[:-len("=abc")] for argv, result in results.items() if argv.endswith("=abc") and
             result.startswith("refused 2")}
    for argv, result in results.items():
        if argv.endswith(("=nan", "=inf")) and argv.rsplit("=", 1)[0] in typed:
            assert result.startswith("refused 2"), (argv, result)
    accepted = [argv for argv, result in results.items() if not result.startswith("refused 2")]
    assert accepted, "every value was refused while parsing: the fuzzing reached no run"


def test_every_script_runs_its_main_through_run_cli():
    for module in SCRIPTS:
        path = os.path.join(REPO, *module.split(".")) + ".py"
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        calls = [ast.unparse(n) for b in blocks for n in ast.walk(b) if isinstance(n, ast.Call)]
        assert "run_cli(main)" in calls, f"{module}: its __main__ block must call run_cli(main)"
