"""
Slow and idle clients: every connection gets a deadline for its request headers and one for its body, and the server
holds at most `max_connections` at once, so clients that connect and send nothing (or a byte a minute) can neither
exhaust the process's open files nor keep others out.

uvicorn has no timeout for a request still arriving (its keep-alive timeout starts after a response), nor a way to
make room for new clients: its limit_concurrency answers 503 to the newest request while the idle connections stay.
So the HTTP protocol here is uvicorn's h11 protocol with three additions (GuardedH11Protocol):
- header timeout: a connection whose request line and headers have not all arrived `header_timeout` seconds after it
  opened (or after its previous response) is closed, with a 408 if it had sent anything;
- body timeout: a body not complete `body_timeout` seconds after its headers is closed (the route sees a disconnect);
- connection limit: past `max_connections` open connections, the oldest one that is still sending its request (or is
  idle between requests) is closed to make room; when every connection is busy with a reply, the newest is closed. A
  warning is logged when the limit is first reached, and then at most every 10 s with the number closed since.
Replies that take long are bounded elsewhere (--max_generation_seconds, --max_queue).
"""

import json
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds for a request line and headers (a few hundred bytes: a real client needs milliseconds)
BODY_TIMEOUT = 30.0  # seconds for a body (at most --max_body_bytes, 1 MiB)
KEEP_ALIVE_TIMEOUT = 5.0  # an idle connection between requests (uvicorn's timeout_keep_alive)
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's max_incomplete_event_size): beyond, 400
FILES_RESERVED = 64  # open files kept for the process itself (model files, logs, the listening socket, pipes)
MAX_CONNECTIONS = 1024  # the automatic limit's ceiling
LOG_EVERY = 10.0  # seconds between two "limit reached" warnings
logger = logging.getLogger("uvicorn.error")

_TIMEOUT_BODY = json.dumps({"error": {"message": "the request did not arrive in time (header timeout)",
                                      "type": "invalid_request_error", "param": None, "code": "timeout"}}).encode()
REQUEST_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                       b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY) + _TIMEOUT_BODY)


def open_files_limit():
    """The soft RLIMIT_NOFILE of this process (None where unknown or unlimited)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def auto_max_connections():
    """The open-file limit minus what the process keeps for itself and what accepting in batches needs (three
    batches of an eighth of the rest: see accept_backlog), at most MAX_CONNECTIONS, at least 8. At `ulimit -n` 1024:
    600; at 128: 40."""
    limit = open_files_limit()
    if limit is None:
        return MAX_CONNECTIONS
    batch = max(8, min(2048, (limit - FILES_RESERVED) // 8))
    return max(8, min(MAX_CONNECTIONS, limit - FILES_RESERVED - 3 * batch))


class ConnectionGuard:
    """What the connections of one server share: the open ones in arrival order, the limits, the counters."""

    def __init__(self, max_connections, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT):
        self.max_connections, self.header_timeout, self.body_timeout = max_connections, header_timeout, body_timeout
        self.open = {}  # protocol -> None; dicts keep insertion order: the oldest first
        self.closed_for_room = 0  # connections closed to make room, since the last warning
        self.closed_total = 0
        self.timed_out = 0
        self.last_warning = None

    def admit(self, protocol):
        """Register a new connection; past the limit, close the oldest one still waiting for its request (or this
        one when all are busy replying)."""
        self.open[protocol] = None
        if len(self.open) <= self.max_connections:
            return
        victim = next((p for p in self.open if p.waiting_for_request()), protocol)
        self.closed_for_room += 1
        self.closed_total += 1
        self.warn(victim)
        victim.close_now()

    def warn(self, victim):
        now = time.monotonic()
        if self.last_warning is None or now - self.last_warning >= LOG_EVERY:
            who = "%s:%d" % victim.client if victim.client else "a client"
            logger.warning(f"connection limit reached ({self.max_connections} open connections, --max_connections): "
                           f"closed {self.closed_for_room} connection(s) still sending their request or idle, the "
                           f"last from {who}")
            self.last_warning, self.closed_for_room = now, 0

    def forget(self, protocol):
        self.open.pop(protocol, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header and body timeouts and the connection limit of a ConnectionGuard
    (the class attribute `guard`, set by guarded_protocol)."""

    guard = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.deadline_handle, self.phase, self.received = None, "reply", 0
        self.guard.admit(self)
        self.track()

    def data_received(self, data):
        self.received += len(data)
        super().data_received(data)
        self.track()

    def on_response_complete(self):
        super().on_response_complete()  # may start a request that was pipelined behind this one
        self.received = 0
        self.track()

    def track(self):
        """Arm the deadline of the phase the request is in: its headers (a fresh deadline only when the phase
        begins: trickling bytes does not extend it), its body, or none once the whole request is in."""
        if self.transport.is_closing():
            return self.disarm()
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.phase != "headers":
                self.arm(self.guard.header_timeout, "headers")
        elif state is h11.SEND_BODY:
            if self.phase != "body":
                self.arm(self.guard.body_timeout, "body")
        else:  # the whole request is in (or the connection is ending): the reply is not timed here
            self.disarm()

    def connection_lost(self, exc):
        self.disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    # -------------------------------------------------------------------------

    def arm(self, seconds, phase):
        self.disarm()
        self.phase = phase
        self.deadline_handle = self.loop.call_later(seconds, self.deadline_passed)

    def disarm(self):
        if self.deadline_handle is not None:
            self.deadline_handle.cancel()
        self.deadline_handle, self.phase = None, "reply"

    def waiting_for_request(self):
        """Still sending its request (headers or body), or idle between requests: it may be closed to make room."""
        return self.deadline_handle is not None

    def deadline_passed(self):
        self.deadline_handle = None
        if self.transport.is_closing():
            return
        self.guard.timed_out += 1
        if self.phase == "headers" and self.received and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(REQUEST_TIMEOUT_408)  # a few bytes: the socket's buffer takes them at once
            self.disarm()
            self.guard.forget(self)
            return self.transport.close()
        self.close_now()

    def close_now(self):
        """Close at once, whatever is left to write (a client that does not read would keep it open)."""
        self.disarm()
        self.guard.forget(self)
        self.transport.abort()


def guarded_protocol(guard):
    """A GuardedH11Protocol class bound to `guard` (uvicorn builds one protocol object per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def server_config(app, host, port, max_connections=-1, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT,
                  log_level="warning"):
    """The uvicorn.Config of chat_web: the guarded h11 protocol, the keep-alive timeout and the header size limit.
    max_connections -1: auto_max_connections(). Returns (config, guard)."""
    import uvicorn

    limit = auto_max_connections() if max_connections == -1 else max_connections
    guard = ConnectionGuard(limit, header_timeout, body_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(guard),
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            backlog=accept_backlog(limit))
    return config, guard


def accept_backlog(max_connections):
    """The listen backlog, which is also how many connections asyncio accepts in one go before any of them can be
    closed to make room: about three such batches are open before the first closes, so they must fit in the open
    files left beyond max_connections (else accept() fails with "too many open files" and stops for a second)."""
    files = open_files_limit()
    spare = (1 << 20) if files is None else files - max_connections
    return max(8, min(2048, spare // 4))
