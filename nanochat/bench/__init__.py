"""
Benchmarks of the project, one module per subcommand of scripts.bench (params, data, train, decode, infer, memory,
scaling), each with a run(args) that prints a table and writes bench_results/<name>.json (args.out).

The peer of each model type is its transformers twin (NanoChatForCausalLM for gpt, Qwen3ForCausalLM for
alcoholic) holding the same weights (nanochat/hf.py). Ours and the peer take turns in one process, round after
round, so load from other processes falls on both alike; each figure is the median of --n rounds, and the table
prints the two side by side with ours / peer. In the JSON, a comparison is {"ours": {...}, "peer": {...},
"ratio": {figure: ours / peer}}. What they share (timed rounds, comparisons, tables, results, the twin) is in
harness.py.
"""
