"""nanochat/common.py: the CPU peak behind MFU is measured once per machine, cached, and never trusted when wrong."""

import json

import pytest

from nanochat import mfu as common


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """A private base dir, and a stand-in for the timed matmuls that counts its calls: (FLOP/s, spread)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    calls = {"n": 0, "result": (2e11, 1.1)}

    def measure():
        calls["n"] += 1
        return calls["result"]

    monkeypatch.setattr(common, "measure_cpu_matmul_flops", measure)
    return calls


def test_cpu_peak_is_cached_per_machine(measured):
    assert common.cpu_peak_flops() == 2e11 and measured["n"] == 1
    with open(common.cpu_peak_path()) as f:
        entry = json.load(f)[common.cpu_peak_key()]
    assert entry["flops"] == 2e11 and entry["spread"] == 1.1
    measured["result"] = (1e9, 1.0)  # a later run under load would measure less: it reads the cache instead
    assert common.get_peak_flops("cpu") == 2e11 and measured["n"] == 1
    common.forget_cpu_peak()  # a peak that proved too low is measured again
    assert common.cpu_peak_flops() == 1e9 and measured["n"] == 2


def test_unsteady_measurement_gives_no_peak(measured, capsys):
    measured["result"] = (2e11, 3.0)  # the median trial 3x slower than the best: the machine is busy
    assert common.cpu_peak_flops() is None and "MFU n/a" in capsys.readouterr().out
    assert common.read_cpu_peaks() == {}  # nothing cached: the next run measures again
    assert common.mfu_percent(1e6, 1e3, None) is None


def test_mfu_is_never_above_100_percent():
    assert common.mfu_percent(1e6, 1e3, 2e9) == pytest.approx(50.0)
    assert common.mfu_percent(1e6, 1e3, 2e9, world_size=2) == pytest.approx(25.0)
    assert common.mfu_percent(1e6, 1e3, 5e8) is None  # 200%: the peak is wrong, not the model fast


def test_real_measurement_is_plausible():
    flops, spread = common.measure_cpu_matmul_flops(n=128, trials=3)
    assert flops > 0 and spread >= 1.0
