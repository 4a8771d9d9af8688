"""One retry policy for the servers a study's driver writes to (the MLflow tracking
server, the database server of the Optuna storage): a call that failed because its
server did not answer is made again every RETRY_PAUSE_S until RETRY_FOR_S have
passed, then its error is raised.

What counts as "did not answer" is the caller's (`transient`): a refused or cut
connection, a server restarting; never a refused request, nor a local store's
error (a full disk does not pass by itself). Each caller makes its retries
idempotent: a retried write must not write twice.
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from lipscale import uris

RETRY_FOR_S = 1800
"""How long a call waits out its server's outage (a restart by hand or by Kubernetes, a
database failover, can take minutes), after the client's own retries of each request."""
RETRY_PAUSE_S = 5

log = logging.getLogger("lipscale.retry")
T = TypeVar("T")


def retried(call: Callable[[], T], transient: Callable[[Exception], bool], server: str) -> T:
    """call(), again every RETRY_PAUSE_S while it fails with an error that `transient` accepts,
    for up to RETRY_FOR_S; `server` names what did not answer in the log."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return call()
        except Exception as e:
            if not transient(e) or time.monotonic() > deadline:
                raise
            first_line = uris.redact(str(e.__cause__ or e).partition("\n")[0])  # Optuna wraps what failed
            log.warning("%s did not answer, retrying in %d s: %s", server, RETRY_PAUSE_S, first_line)
            time.sleep(RETRY_PAUSE_S)
