"""``serve(config)``: bind, run uvicorn on the app until a signal, shut down gracefully."""

from __future__ import annotations

import logging
import socket
import sys

from .config import ServeConfig

__all__ = ["bind_socket", "serve"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read back from the socket).

    Bound before uvicorn starts so the real port can be announced and connections made while
    the app starts up wait in the backlog instead of being refused.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host!r} does not resolve: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(sock: socket.socket) -> bool:
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def serve(config: ServeConfig) -> int:
    """Run the server in this thread until SIGINT/SIGTERM; returns the exit code (1 if the model
    could not be loaded or the engine failed)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ImportError(f"infopt serve needs FastAPI, uvicorn and prometheus_client ({e}); "
                          "install them with: pip install 'infopt[serve]'") from e
    if config.quant is not None:  # a bad alias fails here, before anything loads
        from ..api import parse_option

        parse_option("quant", config.quant)

    log = logging.getLogger("infopt.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(config.log_level.upper())

    sock = bind_socket(config.host, config.port)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=config.log_level, lifespan="on",
        timeout_graceful_shutdown=config.shutdown_timeout,
    ))  # fmt: skip
    host = app.state.host

    def stop_serving() -> None:  # uvicorn polls this flag; safe to set from any thread
        server.should_exit = True

    host.on_failure = stop_serving
    # One line on stderr with the real address (tests and scripts read it for --port 0).
    print(f"infopt serve: listening on {_url(sock)} (model {config.model_name!r} loading; "
          "GET /health answers 200 once ready)", file=sys.stderr, flush=True)
    if config.api_key is None and not _is_loopback(sock):
        print("infopt serve: warning: listening beyond loopback without --api-key: anyone who "
              "can reach this address can use the model", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if host.error:
        print(f"infopt serve: error: {host.error}", file=sys.stderr)
        return 1
    return 0
