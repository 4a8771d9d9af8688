"""The reliability scoreboard.

Every case in this folder takes the `scoreboard` fixture and says what it
injected (a fault) or tried (a bad input); a fault case also counts, from the
real stores (Optuna storage, MLflow runs, results.parquet, checkpoints), what
was lost and what was duplicated (ledger.py). A case counts as survived, or
as a clean error, when its test passed: its assertions are the exact error
and "nothing written", or "nothing lost or duplicated".

At the end of a session that ran every case of the folder, the tally goes to
benchmarks/results/reliability.json and one line is printed:

    reliability: faults injected N / survived N, bad inputs tried N / clean errors N, lost 0, duplicated 0
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results" / "reliability.json"
FOLDER = Path(__file__).parent


@dataclass
class Case:
    test: str
    kind: str
    """'fault' or 'bad input'."""
    what: str
    """What was injected, or tried."""
    passed: bool = False
    """Survived (a fault), or the exact error with nothing written (a bad input)."""
    lost: int | None = None
    duplicated: int | None = None
    counts: dict = field(default_factory=dict)
    """Where the lost and duplicated were looked for, each with its count."""
    seconds: float = 0.0


class Scoreboard:
    def __init__(self, test: str):
        self.test, self.cases = test, []

    def fault(self, what: str) -> None:
        self.cases.append(Case(self.test, "fault", what))

    def bad_input(self, what: str) -> None:
        self.cases.append(Case(self.test, "bad input", what))

    def tally(self, counts: dict[str, dict[str, int]]) -> None:
        """Lost and duplicated, by store: {"trials": {"lost": 0, "duplicated": 0}, ...}."""
        case = self.cases[-1]
        case.counts = counts
        case.lost = sum(c["lost"] for c in counts.values())
        case.duplicated = sum(c["duplicated"] for c in counts.values())


_board: list[Case] = []
_selected: set[str] = set()
_partial: set[str] = set()
_key = pytest.StashKey[Scoreboard]()


@pytest.fixture
def scoreboard(request) -> Scoreboard:
    board = Scoreboard(request.node.nodeid)
    request.node.stash[_key] = board
    return board


def _ours(items) -> set:
    return {item for item in items if Path(item.fspath).parent == FOLDER}


def pytest_collection_modifyitems(session, config, items):
    _selected.update(item.nodeid for item in _ours(items))
    files = {Path(item.fspath).name for item in _ours(items)}
    _partial.update(f"{p.name} not collected" for p in FOLDER.glob("test_*.py") if p.name not in files)


def pytest_deselected(items):
    _partial.update(f"{item.nodeid} deselected" for item in _ours(items))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    board = item.stash.get(_key, None)
    if board is not None:
        for case in board.cases:
            if report.when == "call":
                case.passed, case.seconds = report.passed, round(report.duration, 1)
            elif report.failed:  # a fixture's teardown failed: its stores may be wrong
                case.passed = False
        if report.when == "teardown":
            _board.extend(board.cases)
    return report


def _totals() -> dict:
    faults = [c for c in _board if c.kind == "fault"]
    bad = [c for c in _board if c.kind == "bad input"]
    return {
        "faults_injected": len(faults),
        "faults_survived": sum(c.passed for c in faults),
        "bad_inputs_tried": len(bad),
        "clean_errors": sum(c.passed for c in bad),
        "lost": sum(c.lost or 0 for c in faults),
        "duplicated": sum(c.duplicated or 0 for c in faults),
    }


def pytest_terminal_summary(terminalreporter):
    if not _board:
        return
    t = _totals()
    line = (
        f"reliability: faults injected {t['faults_injected']} / survived {t['faults_survived']}, "
        f"bad inputs tried {t['bad_inputs_tried']} / clean errors {t['clean_errors']}, "
        f"lost {t['lost']}, duplicated {t['duplicated']}"
    )
    missing = _partial | (_selected - {c.test for c in _board})
    if missing:  # a partial run (-k, -x, one file, a crash) must not replace the committed figures
        line += f" (a partial run: {RESULTS.name} not written)"
    else:
        cases = [asdict(c) for c in _board]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        RESULTS.write_text(json.dumps({"when": when, "totals": t, "cases": cases}, indent=1) + "\n")
    terminalreporter.write_line(line)
