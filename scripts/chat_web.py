"""
Chat web server: the chat page and two APIs from one FastAPI app (nanochat/serve: endpoints, errors and limits).

    python -m scripts.chat_web                                   # the largest sft model
    python -m scripts.chat_web --source=base --model_tag=alcoholic_d4 --port=8000
    python -m scripts.chat_web --model_tag=gpt_d4 --model_tag=alcoholic_d4   # two models, a picker in the page
    python -m scripts.chat_web --num_gpus=4                      # 4 replicas, requests spread over them

Open http://127.0.0.1:8000/ for the page, /docs for the API. Limits that keep one client from taking the server
(docs/reliability.md): --max_queue, --max_body_bytes, --max_generation_seconds, --max_connections, --header_timeout,
--body_timeout. Only the server's own page and Host names may use it: --cors_origins and --allowed_hosts add others.
"""

from nanochat.cli import parse, run_cli
from nanochat.serve.app import create_app
from nanochat.serve.config import ChatWebConfig
from nanochat.serve.pool import load_workers


def main(argv=None):
    import uvicorn

    from nanochat.checkpoint import resolve_source
    from nanochat.dist import compute_init, resolve_device_type
    from nanochat.serve.connections import server_config

    args = parse(ChatWebConfig, argv, prog="chat_web.py", description=__doc__)
    device_type = resolve_device_type(args.device_type)
    compute_init(device_type)
    tags = list(dict.fromkeys(args.model_tag)) if args.model_tag else None
    source = resolve_source(args.source, args.model_type)
    workers = load_workers(source, tags, args.num_workers, device_type, args.step, args.model_type)
    app = create_app(workers, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     max_generation_seconds=args.max_generation_seconds, host=args.host,
                     allowed_hosts=args.allowed_hosts or (), cors_origins=args.cors_origins or ())
    config, guard = server_config(app, args.host, args.port, args.max_connections, args.header_timeout,
                                  args.body_timeout)
    print(f"Serving {', '.join(app.state.pools)} ({source}) with {len(workers)} worker(s), at most "
          f"{guard.max_connections} connections: open http://{args.host}:{args.port}/", flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    run_cli(main)
