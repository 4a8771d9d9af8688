"""Every store location a study names, parsed in one place with the standard parsers:
fsspec's protocol split for roots and data (a path, file://, s3://), SQLAlchemy's
make_url for database URLs (the Optuna storage, MLflow's SQL stores), urllib.parse
for the rest (tracking servers, file: stores, Ray addresses).

A URL may carry a password (scheme://user:PASSWORD@host); `redact` hides it
wherever one is printed or logged. Credentials belong in the environment or in
files (PGPASSFILE, MLFLOW_TRACKING_PASSWORD, AWS_*), but a spec may still hold one.
"""

import re
import urllib.parse
import urllib.request
from pathlib import Path

from fsspec.core import split_protocol
from sqlalchemy.engine import make_url

SERVERS = ("http", "https", "databricks")
"""Tracking URI schemes whose server decides where artifacts go (and may be briefly away)."""
_PASSWORD = re.compile(r"(://[^/@\s:]*):[^/@\s]*@")
"""The password of a URL's user info: scheme://user:PASSWORD@host."""


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _PASSWORD.sub(r"\1:***@", text)


def protocol(location: str) -> str | None:
    """fsspec's protocol of a root or data location ('s3', 'file', ...); None for a plain path."""
    return split_protocol(location)[0]


def local_path(location: str) -> Path | None:
    """The local path of a plain path or file:// location; None for a remote one (s3://, ...)."""
    kind, path = split_protocol(location)
    return Path(path) if kind in (None, "file") else None


def bucket(location: str) -> str | None:
    """The bucket of an s3:// location; None for any other."""
    return urllib.parse.urlsplit(location).netloc if protocol(location) == "s3" else None


def with_protocol(path: str, like: str) -> str:
    """`path` as a URI of the filesystem of `like`: Ray hands out checkpoint paths without
    their filesystem's protocol (bucket/key for s3://)."""
    kind = protocol(like)
    return path if kind in (None, "file") else f"{kind}://{path}"


def scheme(url: str) -> str:
    """A store URL's scheme without its driver: 'postgresql+psycopg://...' -> 'postgresql'; a bare
    'databricks' is MLflow's tracking URI of the default profile's workspace."""
    found = urllib.parse.urlsplit(url).scheme.partition("+")[0]
    return found or ("databricks" if url == "databricks" else "")


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (relative to the working directory unless
    absolute, sqlite:////...); None for an in-memory database or any other URL."""
    if scheme(url) != "sqlite":
        return None
    database = make_url(url).database
    return Path(database) if database not in (None, "", ":memory:") else None


def file_store_path(url: str) -> Path:
    """The directory of a file: URI (MLflow's file store)."""
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def is_server(tracking_uri: str) -> bool:
    """Whether an MLflow tracking URI is a server's (else a store this process writes itself)."""
    return scheme(tracking_uri) in SERVERS


def host_port(address: str) -> tuple[str | None, int | None]:
    """(host, port) of HOST:PORT or SCHEME://HOST:PORT (a Ray address); None for a part that
    is missing or not a port number."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    return parts.hostname, port
