"""Running the app: `serve` (blocking, warns about an exposed address without a key) and `running_server`
(a background thread for tests, benchmarks and notebooks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

log = logging.getLogger(__name__)


def loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about before serving: a non-loopback address without an API key."""
    if loopback(host) or api_key:
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the model "
            "(set --api-key or MEDGPT_API_KEY)")


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    warning = exposure_warning(host, app.state.settings.api_key)
    if warning:
        log.warning(warning)
    uvicorn.run(app, host=host, port=port, log_level="info")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                   timeout: float = 30) -> Iterator[str]:
    """Serve `app` in a background thread (tests, benchmarks, notebooks); yields its URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port or free_port(host), log_level="warning"))
    thread = threading.Thread(target=server.run, name="medgpt-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{server.config.port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
