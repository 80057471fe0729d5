"""The server's flags (scripts/chat_web.py), beside the limits they default to."""

from dataclasses import dataclass

from nanochat.config.base import (
    AUTO_OR_POSITIVE_INT,
    NAME,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    PORT,
    POSITIVE,
    POSITIVE_INT,
    Check,
    ConfigError,
    flag,
)
from nanochat.config.evaluate import CheckpointConfig
from nanochat.serve.access import host_pattern_problem, origin_problem
from nanochat.serve.app import MAX_BODY_BYTES
from nanochat.serve.connections import BODY_TIMEOUT, FILES_RESERVED, HEADER_TIMEOUT, open_files_limit
from nanochat.serve.generation import MAX_GENERATION_SECONDS
from nanochat.serve.pool import MAX_QUEUE
from nanochat.serve.schemas import MAX_MAX_TOKENS, MAX_TOP_K


@dataclass(frozen=True)
class ChatWebConfig(CheckpointConfig):
    model_tag: tuple[str, ...] | None = flag(None, "checkpoint folder, e.g. gpt_d4; repeat to serve several (a "
                                             "picker appears); None = the largest", NAME, short="-g", repeat=True)
    num_workers: int = flag(1, "replicas per served model (one per GPU on CUDA)", POSITIVE_INT, short="-n",
                            aliases=("--num_gpus",))
    port: int = flag(8000, "port to listen on", PORT, short="-p")
    host: str = flag("127.0.0.1", "0.0.0.0 to listen on every interface (then give --allowed_hosts the names the "
                     "server is reached by; IP addresses are accepted)", NON_EMPTY)
    allowed_hosts: tuple[str, ...] | None = flag(None, "a Host name the server answers to besides the bound address "
                                                 "and localhost ('*.example.com' patterns; '*' = any, which gives up "
                                                 "the DNS-rebinding defence); repeat for several",
                                                 Check(lambda v: host_pattern_problem(v) is None,
                                                       "a host name, '*.domain' or '*'"), repeat=True)
    cors_origins: tuple[str, ...] | None = flag(None, "a web origin (http(s)://host[:port]) whose pages may call the "
                                                "API; default: only the server's own page; repeat for several",
                                                Check(lambda v: origin_problem(v) is None,
                                                      "an origin 'http(s)://host[:port]' or '*'"), repeat=True)
    temperature: float = flag(0.8, "default temperature", NON_NEGATIVE, short="-t")
    top_k: int = flag(50, "default top-k", NON_NEGATIVE_INT, short="-k")
    max_tokens: int = flag(512, "default max tokens per reply", POSITIVE_INT, short="-m")
    max_queue: int = flag(MAX_QUEUE, "requests that may wait for a replica, per model; one more gets 503 with "
                          "Retry-After", POSITIVE_INT)
    max_body_bytes: int = flag(MAX_BODY_BYTES, "a larger request body gets 413 before it is read", POSITIVE_INT)
    max_generation_seconds: float = flag(MAX_GENERATION_SECONDS, "a reply stops after this long (finish_reason "
                                         "'length')", POSITIVE)
    max_connections: int = flag(-1, "connections open at once; past it the oldest one still sending its request is "
                                "closed (-1: from the open-file limit, 600 at `ulimit -n` 1024, at most 1024)",
                                AUTO_OR_POSITIVE_INT)
    header_timeout: float = flag(HEADER_TIMEOUT, "seconds for a request's line and headers to arrive (408, closed)",
                                 POSITIVE)
    body_timeout: float = flag(BODY_TIMEOUT, "seconds for a request's body to arrive after its headers (closed)",
                               POSITIVE)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.temperature <= 2 or not 1 <= self.top_k <= MAX_TOP_K or \
                not 1 <= self.max_tokens <= MAX_MAX_TOKENS:
            raise ConfigError(f"defaults out of range: --temperature in [0, 2], --top_k in [1, {MAX_TOP_K}], "
                              f"--max_tokens in [1, {MAX_MAX_TOKENS}]")
        files = open_files_limit()
        if files is not None and self.max_connections > files - FILES_RESERVED:
            raise ConfigError(f"--max_connections={self.max_connections} needs more open files than the limit of "
                              f"this process allows ({files}, of which {FILES_RESERVED} are kept for the server "
                              f"itself): raise `ulimit -n` or lower --max_connections")
