"""
Pretraining a base model of any registered architecture (scripts/base_train.py): the data and tokenizer prepared on
first use, the model built by the registry, the batch plan, and the evaluations during training (validation bits per
byte, CORE, samples). The loop is nanochat/trainer.py's.
"""

import dataclasses
import os

import torch.distributed as dist

from nanochat.checkpoint import default_model_tag
from nanochat.config import BaseTrainConfig
from nanochat.core_eval import evaluate_core, prepare_bundle
from nanochat.dataloader import DataLoader
from nanochat.dist import compute_init, on_rank0
from nanochat.fileio import get_base_dir
from nanochat.log import UserError, print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.models import build_model, config_from_depth
from nanochat.plan import CUDA_TOTAL_BATCH, batch_plan, plan_iterations, print_dry_run
from nanochat.report import get_report
from nanochat.start import resume_from
from nanochat.tokenizer import get_token_bytes, get_tokenizer, train_tokenizer, trained_on
from nanochat.trainer import LoaderBatches, Stage, is_due, train
from nanochat.userdata import prepare_own_text, report_lines


def ensure_tokenizer(own):
    """A tokenizer in $NANOCHAT_BASE_DIR/tokenizer: with none there, a 4096-token one is trained on the user's data
    (--data) or on the embedded corpus; downloaded shards need one trained first (its size matters at scale)."""
    from nanochat import dataset

    data_dir = own[0] if own else dataset.get_data_dir()  # builds the embedded corpus shards when no real shards exist
    try:
        get_tokenizer()
        return
    except FileNotFoundError:
        pass
    if own:
        print0(f"No tokenizer found: training a 4096-token BPE tokenizer on the training split of your data (same as: "
               f"python -m scripts.tok_train --data={own[1]['path']} --vocab_size=4096; run that first to choose "
               f"another size)")
        train_tokenizer(vocab_size=4096, data_dir=data_dir, data={k: own[1][k] for k in ("path", "key")})
    elif os.path.abspath(data_dir) != os.path.abspath(os.path.join(get_base_dir(), "embedded_data")):
        raise UserError(f"No tokenizer in {os.path.join(get_base_dir(), 'tokenizer')}. Train one on your "
                        f"data first: python -m scripts.tok_train --vocab_size=65536") from None
    else:
        print0("No tokenizer found: training a 4096-token BPE tokenizer on the embedded corpus "
               "(same as: python -m scripts.tok_train --vocab_size=4096)")
        train_tokenizer(vocab_size=4096)


def ensure_data_and_tokenizer(config, rank=0):
    """(tokenizer, own) after preparing what the run needs: with --data the user's text, prepared once on rank 0
    (own = (shard directory, record); None without --data), else the embedded corpus shards when no real shards
    exist; and a tokenizer (ensure_tokenizer). A tokenizer trained on other data than --data is used, with a note."""
    own = on_rank0(lambda: prepare_own_text(config)) if config.data else None
    if rank == 0:
        ensure_tokenizer(own)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    tokenizer = get_tokenizer()
    if own and rank == 0:
        source = trained_on()
        if not isinstance(source, dict) or source.get("key") != own[1]["key"]:
            what = "the default shards" if source is None else source.get("path") if isinstance(source, dict) \
                else "data it does not record"
            print0(f"note: the tokenizer was trained on {what}, not on this --data; for one fitted to your text run "
                   f"python -m scripts.tok_train --data={own[1]['path']} first")
    return tokenizer, own


SAMPLE_PROMPTS = ["The capital of France is", "Once upon a time", "And God said,", "It is a truth universally"]


def sample(model, tokenizer):
    """Greedy continuations of a few prompts: what the model has learned, at a glance."""
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        out = list(model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


def make_evaluate(config, tokenizer, device, world_size, num_iterations, start_step, data_dir=None):
    """Validation bpb (every --eval_every), CORE (every --core_metric_every) and samples (every --sample_every),
    each also at the end. Returns (evaluate, eval_due)."""
    token_bytes = get_token_bytes(device=device, vocab_size=tokenizer.get_vocab_size())
    micro_tokens = config.device_batch_size * config.max_seq_len * world_size
    eval_tokens = config.eval_tokens if config.eval_tokens > 0 else (
        20 * CUDA_TOTAL_BATCH if device.type == "cuda" else 16 * micro_tokens)
    eval_steps = max(1, eval_tokens // micro_tokens)
    core_bundle = None
    if config.core_metric_every > 0:
        core_bundle, note, _ = prepare_bundle()
        print0(f"CORE every {config.core_metric_every} steps on {core_bundle} ({note})")

    def due(every, step):
        return step == num_iterations or (step > start_step and is_due(every, step))

    def evaluate(model, step):
        val_loader = DataLoader(config.device_batch_size, config.max_seq_len, "val", tokenizer=tokenizer,
                                device=device, data_dir=data_dir)
        results = {"val_bpb": evaluate_bpb(model, val_loader, eval_steps, token_bytes)}
        print0(f"step {step:05d} | validation bpb {results['val_bpb']:.4f}")  # cheap: at every evaluation
        if core_bundle and due(config.core_metric_every, step):
            results["core"] = evaluate_core(model, tokenizer, device, core_bundle, config.core_metric_max_per_task,
                                            progress=False)["core"]
            print0(f"step {step:05d} | CORE {results['core']:.4f}")
        if int(os.environ.get("RANK", 0)) == 0 and due(config.sample_every, step):
            print0("Samples:")
            sample(model, tokenizer)
        return results

    def eval_due(step):
        return any(is_due(every, step) for every in (config.eval_every, config.core_metric_every, config.sample_every))

    return evaluate, eval_due


def check_same_data(meta, record):
    """--resume continues on the data the run started on: the loader's position means nothing in other data."""
    had = (meta.get("data") or {}).get("key")
    now = (record or {}).get("key")
    if had != now:
        was = f"--data={meta['data']['path']} (content hash {had[:16]})" if had else "the default shards (no --data)"
        raise UserError(f"--resume: this run started on {was}, but is now given "
                        + (f"--data={record['path']} (content hash {now[:16]})" if now else "no --data")
                        + ": resume with the same files, unchanged, or train from scratch without --resume")


def model_config(config, vocab_size):
    """The architecture config of the run: config_from_depth with the architecture flags that were given."""
    return config_from_depth(config.model_type, config.depth, config.max_seq_len, vocab_size, **config.model)


def pretrain(config: BaseTrainConfig):
    """Train (or, with --resume, continue) a base model; with --dry_run print the plan and return None."""
    ddp, rank, local_rank, world_size, device = compute_init(config.device_type, seed=config.seed)
    tokenizer, own = ensure_data_and_tokenizer(config, rank)
    data_dir, record = own if own else (None, None)
    vocab_size = tokenizer.get_vocab_size()
    if config.dry_run:
        print_dry_run(config, vocab_size, device.type, world_size)
        return None
    config = dataclasses.replace(config, model_tag=config.model_tag or default_model_tag(config.model_type,
                                                                                          config.depth))
    resume = None
    if config.resume:
        model, resume = resume_from("base", config.model_tag, device, tokenizer, model_type=config.model_type)
        check_same_data(resume.meta, record)
    else:
        model = build_model(config.model_type, model_config(config, vocab_size), device=device)
    num_params, flops_per_token = sum(p.numel() for p in model.parameters()), model.estimate_flops()
    total_batch, grad_accum, note = batch_plan(config, device.type, world_size)
    num_iterations, why = plan_iterations(config, num_params, flops_per_token, total_batch)
    print0(f"Model: {config.model_type} {model.config}")
    print0("Parameters: " + ", ".join(f"{k}={v:,}" for k, v in model.num_params_by_group().items()))
    print0(f"FLOPs per token: {flops_per_token:.3e}")
    if note:
        print0(note)
    print0(f"Batch: {config.device_batch_size} x {config.max_seq_len} x {world_size} ranks x {grad_accum} accumulation "
           f"= {total_batch:,} tokens/step; {num_iterations:,} steps ({why}); {total_batch * num_iterations:,} tokens, "
           f"{total_batch * num_iterations / num_params:.2f} tokens/param")
    loader = DataLoader(config.device_batch_size, config.max_seq_len, "train", tokenizer=tokenizer, device=device,
                        data_dir=data_dir)
    evaluate, eval_due = make_evaluate(config, tokenizer, device, world_size, num_iterations,
                                       resume.step if resume else 0, data_dir)
    meta = {"train_args": dataclasses.asdict(config), "tokenizer_hash": tokenizer.hash, "lineage": [], "data": record}
    stage = Stage("base", "base_train", config.model_tag, num_iterations, LoaderBatches(loader, grad_accum), meta,
                  evaluate, eval_due, tokens_per_step=total_batch)
    results = train(config, model, stage, resume)
    get_report().log(section="Base model training", data=[{"model_tag": config.model_tag, **model.num_params_by_group(),
                     "flops_per_token": flops_per_token, "tokens_per_step": total_batch},
                     report_lines(record) if record else {}, dataclasses.asdict(config), results])
    return results
