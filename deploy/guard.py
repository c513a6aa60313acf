"""Run one Flower process so that nothing it starts outlives it: `python guard.py PARENT_PID -- CMD ...`.

Flower does not clean up after a process that dies abruptly. A SuperNode starts its SuperExec (and the
SuperExec its ClientApp processes) with `--parent-pid`, and they exit only when `kill(parent, 0)` fails;
a SuperNode killed with SIGKILL stays a zombie until its parent reaps it, and an orphaned zombie is
reaped only if the machine's init does so (in containers it often does not), so the SuperExec can run on
for good. The SuperLink starts its SuperExec in a session of its own.

This guard (standard library only, so it starts fast and needs nothing installed) sits between the
helper (deploy.local) and the Flower process. On Linux it:

- dies with its parent: PR_SET_PDEATHSIG, so a helper killed even with SIGKILL sends the guard SIGTERM;
- adopts orphans: PR_SET_CHILD_SUBREAPER, so whatever the Flower process started is reparented to the
  guard when it dies, and is reaped at once (Flower's own parent checks then work);
- runs the Flower process with PR_SET_PDEATHSIG = SIGKILL (it dies if the guard is killed);
- when the Flower process exits, or on SIGTERM, SIGINT or SIGHUP, ends every descendant (SIGTERM, then
  SIGKILL after a grace period), reaps them, and exits with the Flower process's status (or its signal).

Elsewhere it just runs the command and cleans up its descendants it can see.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
GRACE_SECONDS = 10.0


def prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _die_with_guard() -> None:  # preexec_fn of the Flower process: async-signal-safe enough (one syscall)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, by parent id (/proc)."""
    tree: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            tree.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reap(child: int, status: list[int]) -> bool:
    """Reap every exited child (ours and adopted orphans); True while any child is left."""
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == child and not status:
            status.append(code)


def _end_all(child: int, status: list[int], grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _reap(child, status) and not descendants(os.getpid()):
                return
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: guard.py PARENT_PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(argv[0]):  # the parent died before the line above: nobody to run for
        return 1
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: stop.append(s))
    try:
        child = subprocess.Popen(argv[2:], preexec_fn=_die_with_guard if sys.platform == "linux" else None)
    except OSError as e:
        print(f"guard: cannot start {argv[2]}: {e}", file=sys.stderr)
        return 127
    status: list[int] = []
    while not stop and not status:
        _reap(child.pid, status)
        time.sleep(0.1)
    _end_all(child.pid, status, GRACE_SECONDS)
    if not status:
        return 128 + (stop[0] if stop else signal.SIGKILL)
    if os.WIFSIGNALED(status[0]):  # exit as the Flower process did: its signal
        sig = os.WTERMSIG(status[0])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status[0]) if not os.WIFSIGNALED(status[0]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
