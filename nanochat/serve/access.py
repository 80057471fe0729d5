"""
Who may talk to the server: the Host a request names and the web page (Origin) it comes from.

A server on 127.0.0.1 is still reachable from every web page the user opens: the browser sends the page's requests to
it. Two defences, both in one ASGI middleware that runs before anything else:
- Host: a request whose Host header is not the bound address, a name of this machine's loopback (localhost,
  127.0.0.1, ::1) or a name the user allows (--allowed_hosts) gets 400 `invalid_host`. A DNS-rebinding page (a name
  of the attacker's that now resolves to 127.0.0.1) sends its own name as Host, so it is refused. Bound to every
  interface (0.0.0.0 or ::), any IP address is accepted too (an address cannot be rebound), names still are not.
- Origin: a request sent by a page of another origin (its Origin header is not this server's own and not one of
  --cors_origins) gets 403 `origin_not_allowed` before it runs, even the "simple" requests a browser sends without
  asking first; and no Access-Control-Allow-Origin header is sent except to --cors_origins (starlette's
  CORSMiddleware), so other pages cannot read the replies either.
"""

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from nanochat.serve.schemas import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")


def host_name(host_header):
    """The name of a Host header without its port: 'example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def origin_problem(origin):
    """Why `origin` is not an origin ('scheme://host[:port]', or '*' for any) that --cors_origins may list."""
    if origin == "*":
        return None
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or \
            parts.query or parts.fragment or parts.username:
        return "it is not 'http(s)://host[:port]' (or '*')"
    return None


def host_pattern_problem(pattern):
    """Why `pattern` is not a host name (or '*.example.com', or '*') that --allowed_hosts may list."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if pattern == "*" or (name and all(c.isalnum() or c in "-._:[]" for c in name) and "*" not in name):
        return None
    return "it is not a host name, '*.domain' or '*'"


class AccessCheck:
    """ASGI middleware: the Host and Origin checks above. `bound_host` is the address the server listens on,
    `allowed_hosts` more names (or '*.domain' patterns, or '*' for any), `cors_origins` the other origins allowed."""

    def __init__(self, app, bound_host="127.0.0.1", allowed_hosts=(), cors_origins=()):
        self.app = app
        self.names = {n.lower() for n in (*LOOPBACK_NAMES, host_name(bound_host), *allowed_hosts) if n}
        self.any_host = "*" in self.names
        self.suffixes = tuple(n[1:] for n in self.names if n.startswith("*."))
        self.any_ip = bound_host in ALL_INTERFACES
        self.origins = {o.lower().rstrip("/") for o in cors_origins}

    def allowed(self, name):
        if not name:
            return False
        return self.any_host or name in self.names or name.endswith(self.suffixes) or (self.any_ip and is_ip(name))

    def origin_ok(self, origin, scope, host):
        origin = origin.strip().lower().rstrip("/")
        return origin == f"{scope.get('scheme', 'http')}://{host.strip().lower()}" or origin in self.origins or \
            "*" in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.allowed(host_name(host)):
            response = error_response(400, f"Host {host[:100]!r} is not served here: this server answers to "
                                      f"{', '.join(sorted(self.names))} (--allowed_hosts adds names)", None,
                                      "invalid_host")
            return await response(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin, scope, host):
            response = error_response(403, f"requests from the web page {origin[:100]!r} are not allowed "
                                      f"(--cors_origins allows other origins)", None, "origin_not_allowed")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
