import os

from nanochat.report import DummyReport, Report, get_report, read_metrics_jsonl, truncate_metrics


def test_log_appends_entries_and_renders_dicts(tmp_path):
    report = Report(str(tmp_path))
    report.log(section="Base model training", data=[{"model_tag": "gpt_d4", "val_bpb": 1.23456, "steps": 20000,
                                                     "skipped": None}, {"model_tag": "", "seed": 1}])
    report.log(section="Base model training", data=["free text", {"model_tag": "alcoholic_d4"}])
    text = (tmp_path / "base-model-training.md").read_text()
    assert text.count("## Base model training") == 1 and text.count("timestamp: ") == 2
    assert "- val_bpb: 1.2346" in text and "- steps: 20,000" in text and "skipped" not in text
    assert "- model_tag: \n" not in text  # a key already written in the entry is not repeated
    assert "free text" in text and "- model_tag: alcoholic_d4" in text


def test_reset_writes_the_header_and_clears_sections(tmp_path):
    report = Report(str(tmp_path))
    report.log(section="Chat SFT", data=[{"val_loss": 1.0}])
    (tmp_path / "compare.md").write_text("kept")
    report.reset()
    assert not (tmp_path / "chat-sft.md").exists() and (tmp_path / "compare.md").read_text() == "kept"
    header = (tmp_path / "header.md").read_text()
    for field in ("Run started: ", "- Git: ", "- CPU: ", "torch ", "- GPUs: "):
        assert field in header


def test_generate_orders_sections_and_summarises(tmp_path):
    report = Report(str(tmp_path))
    report.reset()
    report.log(section="Chat evaluation sft", data=[{"model_tag": "gpt_d4", "ARC-Easy": 0.3, "ChatCORE": 0.1}])
    report.log(section="Base model evaluation", data=[{"model_tag": "gpt_d4", "CORE": 0.05}])
    report.log(section="Tokenizer training", data=[{"vocab_size": 4096}])
    text = open(report.generate()).read()
    order = [text.index(s) for s in ("## Tokenizer training", "## Base model evaluation", "## Chat evaluation sft",
                                     "## Summary")]
    assert order == sorted(order)
    assert "| Base model evaluation | gpt_d4 | CORE | 0.0500 |" in text
    assert "| Chat evaluation sft | gpt_d4 | ChatCORE | 0.1000 |" in text
    assert "Total wall-clock time: " in text


def test_only_rank_zero_writes_and_it_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert isinstance(get_report(), Report)
    monkeypatch.setenv("RANK", "1")
    assert isinstance(get_report(), DummyReport)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("NANOCHAT_REPORT", "0")
    get_report().log(section="Chat SFT", data=[{"x": 1}])
    assert not os.path.exists(tmp_path / "report")


def test_metrics_jsonl_truncated_on_resume_and_read_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 5.0}\n{"step": 0, "val_bpb": 3.0}\n{"step": 1, "loss": 4.0}\n{"step": 2, "lo')
    truncate_metrics(str(path), 1)
    train, val = read_metrics_jsonl(str(tmp_path))
    assert [r["step"] for r in train] == [0] and [r["val_bpb"] for r in val] == [3.0]
