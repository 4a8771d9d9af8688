"""One driver per study: a lease in the study's Optuna database (a table of our own,
lipscale_leases), taken by the driver that runs the study and renewed by its heartbeat.

Two drivers on one storage would each take the other's live trials for a dead
driver's orphans (`Store.reconcile`: marked FAIL and run again, twice). The second
is refused instead, with the holder's name and when its lease goes stale. A driver
that died without giving its lease back (SIGKILL, a lost node) is taken over once
its heartbeat is STALE_AFTER_S old, or at once when it ran on this machine and its
process is gone (or is this one, whose block ended while the storage was away).

Taking, renewing and giving back are each one conditional statement (an INSERT, an
UPDATE or DELETE ... WHERE holder = ...): atomic in SQLite and PostgreSQL alike, so
of two drivers starting together one wins. Heartbeats compare the drivers' clocks
(time.time()): seconds apart under NTP, against a minute of staleness.
"""

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil
import sqlalchemy
from sqlalchemy import Column, Float, Integer, String

from lipscale.spec import SpecError

HEARTBEAT_S = 10
STALE_AFTER_S = 60
"""A lease whose heartbeat is this old is stale: six heartbeats missed (a driver stalled or cut
off from its storage that long is taken for dead; a PostgreSQL restart takes seconds)."""

log = logging.getLogger("lipscale.lease")
_TABLE = sqlalchemy.Table(
    "lipscale_leases",
    sqlalchemy.MetaData(),
    Column("study", String(512), primary_key=True),
    Column("token", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
)


_HELD: set[str] = set()
"""Tokens of the leases this process holds. One it no longer holds but the storage still has was
left by a block that ended while the storage was away (the driver stopped on its outage): the
same process may run the study again at once."""


class StudyBusy(SpecError):
    """Another driver holds the study's lease."""


@dataclass(frozen=True)
class Holder:
    """A driver holding a study's lease: its process (host, pid and start time) and last heartbeat."""

    token: str
    host: str
    pid: int
    started: float
    """The process's start time: a pid reused by another process is not the holder."""
    heartbeat: float

    def alive(self, now: float) -> bool:
        """Whether it may still be running: a fresh heartbeat, and its process there if it is here."""
        if now - self.heartbeat > STALE_AFTER_S:
            return False
        if self.host != socket.gethostname():
            return True
        if self.pid == os.getpid():  # this process: alive while one of its Leases holds it
            return self.token in _HELD
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1
        except psutil.NoSuchProcess:
            return False

    def describe(self, now: float) -> str:
        return f"pid {self.pid} on {self.host}, last heartbeat {now - self.heartbeat:.0f} s ago"

    def stale_at(self) -> str:
        return datetime.datetime.fromtimestamp(self.heartbeat + STALE_AFTER_S).strftime("%H:%M:%S")


def holder(engine: sqlalchemy.Engine, study: str) -> Holder | None:
    """The study's lease as its holder last renewed it; None when none is held (or the table is not
    there: a study from before leases)."""
    if not sqlalchemy.inspect(engine).has_table(_TABLE.name):
        return None
    with engine.connect() as c:
        row = c.execute(sqlalchemy.select(_TABLE).where(_TABLE.c.study == study)).first()
    return None if row is None else Holder(row.token, row.host, row.pid, row.started, row.heartbeat)


class Lease:
    """`with Lease(engine, study):` holds the study's lease while the block runs (StudyBusy if
    another live driver does), renewed every HEARTBEAT_S by a thread; given back at the end."""

    def __init__(self, engine: sqlalchemy.Engine, study: str):
        self.engine, self.study = engine, study
        me = psutil.Process()
        self.me = dict(token=uuid.uuid4().hex, host=socket.gethostname(), pid=me.pid, started=me.create_time())
        self._stop = threading.Event()

    def __enter__(self) -> "Lease":
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name="lipscale-lease", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        _HELD.discard(self.me["token"])
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # unreachable: it goes stale instead
            self._execute(_TABLE.delete().where(self._mine()))

    def _mine(self):
        return (_TABLE.c.study == self.study) & (_TABLE.c.token == self.me["token"])

    def _execute(self, statement) -> int:
        with self.engine.begin() as c:
            return c.execute(statement).rowcount

    def acquire(self) -> None:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # another driver created it meanwhile
            _TABLE.create(self.engine, checkfirst=True)
        while True:
            now = time.time()
            try:
                self._execute(_TABLE.insert().values(study=self.study, heartbeat=now, **self.me))
                _HELD.add(self.me["token"])
                return
            except sqlalchemy.exc.IntegrityError:
                pass  # held, or left behind by a driver that died
            current = holder(self.engine, self.study)
            if current is None:
                continue  # given back meanwhile
            if current.alive(now):
                raise StudyBusy(
                    f"storage.optuna: study {self.study!r} is being run by another driver ({current.describe(now)}); "
                    "one driver runs a study at a time: wait for it to end, or stop it. A driver that died without "
                    f"a trace leaves its lease stale {STALE_AFTER_S} s after its last heartbeat, at "
                    f"{current.stale_at()}: the study can be run again then"
                )
            taken = (_TABLE.c.study == self.study) & (_TABLE.c.token == current.token)
            if self._execute(_TABLE.update().where(taken & (_TABLE.c.heartbeat == current.heartbeat))
                             .values(heartbeat=now, **self.me)):  # fmt: skip
                log.warning("took over study %s from a driver that stopped (%s)", self.study, current.describe(now))
                _HELD.add(self.me["token"])
                return

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._execute(_TABLE.update().where(self._mine()).values(heartbeat=time.time())):
                    log.error("study %s: another driver took this one's lease (its heartbeat was late)", self.study)
                    return
            except sqlalchemy.exc.SQLAlchemyError as e:  # the storage is away: the next beat tries again
                log.warning("study %s: the lease's heartbeat did not reach the storage: %s", self.study, e)

