"""Named crash points: where a crash could leave a run half done, and a way to crash there.

Resuming must hold wherever a kill lands.  The moments most likely to break it are short
(a file half written, a round's replies in but not aggregated), so a test that only kills
at random times would rarely hit them.  :func:`crash_point` marks each such moment; it
does nothing unless the environment variable ``FEDPEFT_CRASH_AT`` names it, so normal
runs pay one dictionary lookup.  ``benchmarks/crash_resume.py`` and
``tests/integration/test_crash_resume.py`` set it to SIGKILL a real ``fedpeft run`` at
exactly those moments (and also at seeded random times), then check that the resumed
run equals the one left alone.

:func:`drill` is that test's driver: start a run as a subprocess, SIGKILL its whole
process tree at each planned moment, resume, and finally let it finish.

Standard library only at import time: the results writer and checkpoints import it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fedpeft.recovery import CHECKPOINT_FILE

CRASH_ENV = "FEDPEFT_CRASH_AT"  # "point:n[,point:n...]": crash the n-th time this process gets there
CRASH_SIGNAL_ENV = "FEDPEFT_CRASH_SIGNAL"  # a file to create, then freeze until killed from outside
#: The named moments (each a place where a crash could leave a half-done state behind).
CRASH_POINTS = (
    "train",  # a client has trained, its reply not yet sent
    "aggregate",  # the server has every reply of a round, nothing aggregated yet
    "record",  # the round's record is half appended to the results files
    "checkpoint-write",  # the server checkpoint is half written
    "client-state-write",  # a client's persistent state is half written
)
_passed: Counter[str] = Counter()


@functools.cache
def _crash_plan(spec: str) -> dict[str, int]:
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition(":")
        if name not in CRASH_POINTS:
            raise ValueError(f"{CRASH_ENV}: unknown crash point {name!r} (valid: {', '.join(CRASH_POINTS)})")
        plan[name] = int(nth or 1)
    return plan


def crash_point(name: str) -> None:
    """Crash here if ``FEDPEFT_CRASH_AT`` asks for this point (a no-op otherwise).

    With ``FEDPEFT_CRASH_SIGNAL`` set, the process writes that file and freezes until
    whoever set it kills the whole run (a Ray worker cannot kill the driver itself);
    without it, the process SIGKILLs itself.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    plan = _crash_plan(spec)
    if name not in plan:
        return
    _passed[name] += 1
    if _passed[name] != plan[name]:
        return
    flag = os.environ.get(CRASH_SIGNAL_ENV)
    if flag:
        Path(flag).write_text(f"{name}:{plan[name]} pid {os.getpid()}\n")
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # frozen mid-operation until the SIGKILL arrives
        time.sleep(1.0)


# ---------------------------------------------------------------------- the crash drill
@dataclass(frozen=True)
class Kill:
    """One SIGKILL of a whole run: at the ``nth`` pass of a crash point, or ``seconds`` after start."""

    point: str | None = None
    nth: int = 1
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.point}:{self.nth}" if self.point else f"t+{self.seconds:.1f}s"


def plan_kills(seed: int | str, count: int, duration: float, max_nth: Mapping[str, int]) -> list[Kill]:
    """``count`` kills drawn from ``seed``: half at random times within a run of ``duration``
    active seconds (see :class:`Outcome`), half at crash points (uniform over ``max_nth``'s
    points and passes)."""
    rng = random.Random(f"fedpeft-crash-{seed}")
    kills = []
    for i in range(count):
        if i % 2 == 0:
            kills.append(Kill(seconds=round(rng.uniform(0.2, 0.75) * duration, 1)))
        else:
            point = rng.choice(sorted(max_nth))
            kills.append(Kill(point, rng.randint(1, max(1, max_nth[point]))))
    return kills


@dataclass
class Attempt:
    """What one process of a drill did."""

    command: str  # "start" or "resume"
    kill: str  # the planned kill ("" for the final run to completion)
    killed: bool  # whether the kill landed before the process finished
    seconds: float


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (Ray starts some in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=60)


class Outcome(NamedTuple):
    """How one process of a drill ended."""

    killed: bool  # False when it finished first (a crash point never reached, a late time)
    code: int  # its exit code (-9 when killed)
    active_seconds: float  # from its first line (imports and model load done) to its end


#: What ``fedpeft run`` prints once its model is loaded: time kills count from there, so
#: that start-up, which varies with the machine's load, does not decide where they land.
START_LINE = b"fedpeft: "


def run_once(command: Sequence[str], kill: Kill | None, *, log: Path, timeout: float) -> Outcome:
    """Run ``command``; with ``kill``, SIGKILL its whole tree at that moment.

    A time kill counts its seconds from the process's first ``fedpeft:`` line.
    """
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    flag = log.with_suffix(".crashed")
    flag.unlink(missing_ok=True)
    if kill is not None and kill.point:
        env |= {CRASH_ENV: f"{kill.point}:{kill.nth}", CRASH_SIGNAL_ENV: str(flag)}
    offset = log.stat().st_size if log.is_file() else 0
    started = time.monotonic()
    active: float | None = None  # when the start line appeared
    with log.open("ab") as out:
        proc = subprocess.Popen(list(command), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if active is None and _printed(log, offset, START_LINE):
                    active = now
                if kill is None:
                    due = False
                elif kill.point:
                    due = flag.is_file()
                else:
                    due = active is not None and now - active >= kill.seconds
                if due:
                    kill_tree(proc.pid)
                    proc.wait()
                    return Outcome(True, -9, now - (active or now))
                if now - started > timeout:
                    kill_tree(proc.pid)
                    raise TimeoutError(f"{' '.join(command)} ran past {timeout:.0f} s (log: {log})")
                time.sleep(0.02)
        except BaseException:
            kill_tree(proc.pid)
            raise
    end = time.monotonic()
    return Outcome(False, proc.returncode, end - (active or end))


def _printed(log: Path, offset: int, needle: bytes) -> bool:
    with log.open("rb") as fh:
        fh.seek(offset)
        text = fh.read()
    return text.startswith(needle) or b"\n" + needle in text


def drill(
    start: Sequence[str],
    resume: Sequence[str],
    run_dir: Path,
    kills: Sequence[Kill],
    *,
    log: Path,
    timeout: float = 900.0,
) -> list[Attempt]:
    """Start a run, SIGKILL it at each of ``kills`` in turn (resuming in between), then let it finish.

    After each kill the run is resumed if it had checkpointed a round, else started again
    (as a user or ``fedpeft sweep`` would).  Raises if the last process does not end well.
    """
    attempts = []
    for kill in [*kills, None]:
        resumable = (run_dir / CHECKPOINT_FILE).is_file()
        t0 = time.monotonic()
        killed, code, _ = run_once(resume if resumable else start, kill, log=log, timeout=timeout)
        attempts.append(
            Attempt("resume" if resumable else "start", str(kill or ""), killed, time.monotonic() - t0)
        )
        if not killed and code != 0:
            raise RuntimeError(f"{'resume' if resumable else 'start'} exited with {code} (log: {log})")
        if kill is not None and not killed:  # finished before this kill: nothing left to crash
            break
    return attempts


#: Per-round fields that differ between two runs of the same seed by design.
TIMING_FIELDS = ("wall_seconds", "time_split")
#: Byte fields of a whole message: they include node ids, which Flower's engines draw at random.
MESSAGE_BYTE_FIELDS = ("bytes_up", "bytes_down", "cum_bytes_up", "cum_bytes_down")


def comparable(rounds: Sequence[Mapping[str, Any]], *, message_bytes: bool = True) -> list[dict[str, Any]]:
    """Round records minus what may differ between equal runs: wall time and node ids, and
    (``message_bytes=False``, for Flower's engines) the message sizes those ids change."""
    drop = set(TIMING_FIELDS) | (set() if message_bytes else set(MESSAGE_BYTE_FIELDS))
    out = []
    for r in rounds:
        row = {k: v for k, v in r.items() if k not in drop}
        row["clients"] = [
            {k: v for k, v in c.items() if k != "node_id" and k not in drop} for c in r["clients"]
        ]
        out.append(row)
    return out
