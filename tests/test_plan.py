"""nanochat/plan.py: the peak-memory estimate counts what training holds, op by op, on fake tensors."""

import pytest
import torch

from nanochat.models import MODEL_TYPES, config_from_depth
from nanochat.plan import LiveBytes, meta_model, tensor_peak_bytes


def test_live_bytes_counts_the_high_water_mark():
    with LiveBytes() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(1000)
        del a
        c = torch.empty(500)
    assert tracker.peak == tracker.heap_peak == 8000 and sum(tracker.live.values()) == 6000
    del b, c


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_estimate_holds_states_and_activations(model_type):
    config = config_from_depth(model_type, 2, 64, 64, head_dim=32)
    groups = meta_model(model_type, config).num_params_by_group()
    n, n_muon = groups["total"], groups["matrices"]
    states = 4 * (2 * n + 2 * (n - n_muon) + n_muon)  # fp32 weights, grads, AdamW moments, Muon momentum
    peak = tensor_peak_bytes(model_type, config, 8, 64, "cpu").peak
    assert peak > states
    # activations dominate at this shape: recomputing them in backward lowers the peak
    assert tensor_peak_bytes(model_type, config, 8, 64, "cpu", activation_checkpointing=True).peak < peak
