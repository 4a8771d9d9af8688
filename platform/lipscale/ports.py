"""A free TCP port, for the servers that tests and infra/local start on this machine
(standard library only: infra/local/stack.py imports it before anything else is up)."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on at `host` now, picked by the OS (another process
    could still take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
