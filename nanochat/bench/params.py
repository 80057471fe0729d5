"""bench params: parameter counts by group and FLOPs/token of every preset, and of every type at some depths."""

from nanochat.bench.harness import print_table, write_results
from nanochat.log import print0
from nanochat.models import MODEL_TYPES, config_from_depth, presets
from nanochat.plan import describe, human


def run(args):
    rows = [(f"{name} (preset)", describe(t, config)) for name, (t, config) in presets().items()]
    for depth in args.depths:
        for t in MODEL_TYPES:
            config = config_from_depth(t, depth, args.max_seq_len, args.vocab_size)
            rows.append((f"{t} d{depth}", describe(t, config)))
    cols = ["shape", "embedding", "lm_head", "matrices", "norms", "total", "flops"]
    print_table(["model"] + cols[:-1] + ["FLOPs/token"],
                [[name] + [r[k] if k == "shape" else human(r[k]) for k in cols] for name, r in rows])
    print0(f"\nconfig_from_depth rows use max_seq_len={args.max_seq_len}, vocab_size={args.vocab_size}; "
           f"FLOPs/token = 6 * non-embedding params + attention (forward + backward)")
    write_results(args, "params", {name: r for name, r in rows})
