"""
Chat web server: the chat page and two APIs from one FastAPI app (nanochat/serve: endpoints, errors and limits).

    python -m scripts.chat_web                                   # the largest sft model
    python -m scripts.chat_web --source=base --model_tag=alcoholic_d4 --port=8000
    python -m scripts.chat_web --model_tag=gpt_d4 --model_tag=alcoholic_d4   # two models, a picker in the page
    python -m scripts.chat_web --num_gpus=4                      # 4 replicas, requests spread over them

Open http://127.0.0.1:8000/ for the page, /docs for the API. Limits that keep one client from taking the server
(docs/reliability.md): --max_queue, --max_body_bytes, --max_generation_seconds.
"""

import argparse

from nanochat.checkpoint import add_checkpoint_args
from nanochat.cli import non_negative_float, non_negative_int, port_number, positive_float, positive_int, run_cli
from nanochat.serve.app import MAX_BODY_BYTES, create_app
from nanochat.serve.generation import MAX_GENERATION_SECONDS
from nanochat.serve.pool import MAX_QUEUE, load_workers
from nanochat.serve.schemas import MAX_TOP_K


def build_parser():
    parser = argparse.ArgumentParser(description="nanochat web server: chat page, nanochat and OpenAI APIs",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(parser, several_tags=True)  # base models complete text instead of chatting
    parser.add_argument("-n", "--num_gpus", "--num_workers", dest="num_workers", type=positive_int, default=1,
                        help="replicas per served model (one per GPU on CUDA)")
    parser.add_argument("-p", "--port", type=port_number, default=8000, help="port to listen on")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--device_type", type=str, default="", help="cuda|cpu|mps; empty: autodetect")
    parser.add_argument("-t", "--temperature", type=non_negative_float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top_k", type=non_negative_int, default=50, help="default top-k")
    parser.add_argument("-m", "--max_tokens", type=positive_int, default=512, help="default max tokens per reply")
    parser.add_argument("--max_queue", type=positive_int, default=MAX_QUEUE,
                        help="requests that may wait for a replica, per model; one more gets 503 with Retry-After")
    parser.add_argument("--max_body_bytes", type=positive_int, default=MAX_BODY_BYTES,
                        help="a larger request body gets 413 before it is read")
    parser.add_argument("--max_generation_seconds", type=positive_float, default=MAX_GENERATION_SECONDS,
                        help="a reply stops after this long (finish_reason 'length')")
    return parser


def main(argv=None):
    import uvicorn

    from nanochat.checkpoint import resolve_source
    from nanochat.cli import parse_args
    from nanochat.dist import compute_init, resolve_device_type

    args = parse_args(build_parser(), argv)
    if args.num_workers < 1:
        raise SystemExit(f"--num_workers must be >= 1, got {args.num_workers}")
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= MAX_TOP_K or not 1 <= args.max_tokens <= 4096:
        raise SystemExit("defaults out of range: --temperature in [0, 2], --top_k in [1, 200], --max_tokens in "
                         "[1, 4096]")
    if args.max_queue < 0 or args.max_body_bytes < 0 or not args.max_generation_seconds > 0:
        raise SystemExit(f"limits out of range: --max_queue >= 0 (got {args.max_queue}), --max_body_bytes >= 0 (got "
                         f"{args.max_body_bytes}), --max_generation_seconds > 0 (got {args.max_generation_seconds})")
    device_type = resolve_device_type(args.device_type)
    compute_init(device_type)
    tags = list(dict.fromkeys(args.model_tag)) if args.model_tag else None
    args.source = resolve_source(args.source, args.model_type)
    workers = load_workers(args.source, tags, args.num_workers, device_type, args.step, args.model_type)
    app = create_app(workers, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     max_generation_seconds=args.max_generation_seconds)
    print(f"Serving {', '.join(app.state.pools)} ({args.source}) with {len(workers)} worker(s): "
          f"open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
