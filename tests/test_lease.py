"""One driver per study (lipscale.lease): a second one is refused while the first holds the
study's lease; a lease whose heartbeat is stale, or whose driver's process is gone, is
taken over; and `lipscale status` says whether a driver is running the study."""

import re
import socket
import subprocess
import time

import pytest
import sqlalchemy
import yaml
from test_spec import small

from lipscale import cli, lease
from lipscale.lease import Lease, StudyBusy, holder
from lipscale.spec import parse_spec
from lipscale.store import distributions, open_store


@pytest.fixture
def store(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(small(tmp_path / "root")))
    return open_store(parse_spec(small(tmp_path / "root")), create=True)


def _age(store, seconds: float, **row) -> None:
    """Makes the study's lease `seconds` old (and its holder `row`), as a driver that stopped would leave it."""
    with store.storage.engine.begin() as c:
        c.execute(sqlalchemy.text(f"UPDATE lipscale_leases SET heartbeat = heartbeat - {seconds}"))
        for column, value in row.items():
            c.execute(sqlalchemy.text(f"UPDATE lipscale_leases SET {column} = :v"), {"v": value})


def test_a_second_driver_is_refused_naming_the_holder_and_when_its_lease_goes_stale(
    store, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 3600)  # one heartbeat, at the start: `stale` below is its
    with Lease(store.storage.engine, "small"):
        assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
        first = holder(store.storage.engine, "small")
    error = capsys.readouterr().err
    stale = time.strftime("%H:%M:%S", time.localtime(first.heartbeat + lease.STALE_AFTER_S))
    assert re.fullmatch(
        re.escape(
            f"error: storage.optuna: study 'small' is being run by another driver (pid {first.pid} on "
            f"{socket.gethostname()}, last heartbeat <seconds> s ago); one driver runs a study at a time: wait for it to end, "
            f"or stop it. A driver that died without a trace leaves its lease stale 60 s after its last heartbeat, at "
            f"{stale}: the study can be run again then\n"
        ).replace("<seconds>", r"\d+"),  # seconds since the lease was taken: the CLI's imports on a busy machine
        error,
    ), error
    assert [t.state.name for t in store.study.trials] == []  # nothing reconciled, nothing asked
    assert holder(store.storage.engine, "small") is None  # given back at the end of the block


def test_a_lease_whose_heartbeat_is_stale_is_taken_over(store):
    first = Lease(store.storage.engine, "small")
    first.acquire()
    _age(store, lease.STALE_AFTER_S - 5, host="another-host")  # a driver elsewhere, 55 s without a heartbeat
    with pytest.raises(StudyBusy, match=r"\(pid \d+ on another-host, last heartbeat 55 s ago\)"):
        Lease(store.storage.engine, "small").acquire()
    _age(store, 10)  # 65 s: stale
    second = Lease(store.storage.engine, "small")
    second.acquire()
    assert holder(store.storage.engine, "small").token == second.me["token"] != first.me["token"]


def test_the_lease_of_a_driver_whose_process_is_gone_is_taken_over_at_once(store):
    Lease(store.storage.engine, "small").acquire()
    gone = subprocess.Popen(["true"])
    gone.wait()
    _age(store, 0, pid=gone.pid)  # this machine, a fresh heartbeat, no such process
    taker = Lease(store.storage.engine, "small")
    taker.acquire()
    assert holder(store.storage.engine, "small").token == taker.me["token"]


def test_the_heartbeat_renews_the_lease_while_its_driver_runs(store, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.1)
    with Lease(store.storage.engine, "small"):
        before = holder(store.storage.engine, "small").heartbeat
        time.sleep(0.5)
        assert holder(store.storage.engine, "small").heartbeat > before


def test_status_of_a_killed_study_says_it_is_not_running_and_how_to_resume_it(store, tmp_path, capsys):
    store.study.ask(distributions(store.spec))  # a trial a driver handed out
    Lease(store.storage.engine, "small").acquire()
    gone = subprocess.Popen(["true"])
    gone.wait()
    _age(store, 120, pid=gone.pid)  # then it was SIGKILLed, two minutes ago
    assert cli.main(["status", str(tmp_path / "spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert "1 trials (1 RUNNING)" in out
    assert re.search(
        rf"\nnot running \(its last driver, pid {gone.pid} on {re.escape(socket.gethostname())}, last heartbeat 12\d s "
        rf"ago, is gone\): its 1 RUNNING trials stopped with their driver; `lipscale resume {tmp_path}/spec.yaml` "
        r"resumes them from their last checkpoints\n$",
        out,
    ), out


def test_a_lease_this_process_could_not_give_back_does_not_keep_it_from_running_the_study_again(store, monkeypatch):
    with Lease(store.storage.engine, "small") as first:

        def unreachable(statement):
            raise sqlalchemy.exc.OperationalError(str(statement), {}, ConnectionRefusedError("the storage is away"))

        monkeypatch.setattr(first, "_execute", unreachable)  # the block ends during a storage outage
    assert holder(store.storage.engine, "small").token == first.me["token"]  # left behind, fresh
    again = Lease(store.storage.engine, "small")
    again.acquire()
    assert holder(store.storage.engine, "small").token == again.me["token"]
