"""A SuperLink and SuperNodes as local processes (loopback federation for tests and development).

    with LocalFederation(workdir, certs=generate(workdir / "certs", "127.0.0.1", nodes=3)) as fed:
        fed.start_superlink()                       # TLS + SuperNode authentication
        fed.register(fed.certs.node_public(0))      # flwr supernode register KEY.pub CONN
        fed.start_supernode("cam-0", {"tasks": "seg,depth", ...}, key=fed.certs.node_keys[0])
        result = run_and_wait(app_dir, fed.connection, {...}, env=fed.env)

Every Flower process runs under a guard (deploy/guard.py) in a session and process group of its own, with
a log file under `workdir/logs/`. The guard ends everything the Flower process started as soon as it exits
(a SuperNode killed with SIGKILL takes its SuperExec and ClientApps with it), and on Linux it dies with the
helper's process (PR_SET_PDEATHSIG): a helper killed even with SIGKILL leaves nothing running. `stop()`
(also on leaving the `with` block, whatever happened inside, and at interpreter exit) ends each process it
started and everything below it, first with SIGTERM, then SIGKILL. Ports are free ones found by binding
port 0 on the host. Start a LocalFederation from a thread that outlives it: Linux delivers the parent-death
signal when the thread that started the process ends.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.certs import Certificates
from deploy.flwr_run import (
    RunError,
    _first_line,
    config_value,
    executable,
    flwr_env,
    parse_json_output,
    write_connection,
)

HOST = "127.0.0.1"
GUARD = Path(__file__).resolve().with_name("guard.py")  # standard library only: run by path, fast to start
_LIVE: weakref.WeakSet = weakref.WeakSet()  # federations to stop at interpreter exit


@atexit.register
def _stop_all() -> None:
    for federation in list(_LIVE):
        federation.stop(grace=5.0)


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_config_arg(config: Mapping[str, Any]) -> str:
    """`--node-config` text: `key='value' key2=3` (parsed by Flower like --run-config)."""
    return " ".join(config_value(key, value, "node config") for key, value in config.items())


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux); empty elsewhere."""
    tree: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalFederation:
    """Start a SuperLink and SuperNodes on this machine; stop all of them (and their children) at the end."""

    def __init__(self, workdir: Path, *, certs: Certificates | None = None, auth: bool = True,
                 host: str = HOST, connection: str = "local-link", isolation: str = "subprocess") -> None:
        self.workdir = Path(workdir).resolve()
        self.certs = certs
        self.auth = auth and certs is not None  # Flower refuses node authentication without TLS
        self.host = host
        self.connection = connection
        self.isolation = isolation
        self.home = self.workdir / "flwr-home"
        self.env = flwr_env(self.home)
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a loopback federation reports nothing outside
        self.processes: list[Process] = []
        self.leftovers: list[int] = []  # pids still there after stop() (normally none)
        self.port: int | None = None
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.leftovers = self.stop()

    def _spawn(self, name: str, args: list[str]) -> Process:
        log = self.workdir / "logs" / f"{name}.log"
        guarded = [sys.executable, str(GUARD), str(os.getpid()), "--", *args]
        with open(log, "wb") as out:
            popen = subprocess.Popen(guarded, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.workdir, start_new_session=True)
        _LIVE.add(self)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every started process group and every descendant, wait, then SIGKILL what is left.

        Each started process is a guard (deploy/guard.py) that ends its own descendants on SIGTERM; they are
        also found here by parent id, and by the `--parent-pid PID` argument with which
        SuperLink and SuperNode start their SuperExec (it outlives a parent that died early, in a session
        of its own). Returns the pids still there afterwards (normally none).
        """
        started = [p.popen.pid for p in self.processes]
        pids: set[int] = {p.popen.pid for p in self.processes if p.popen.poll() is None}
        for pid in started:
            pids.update(descendants(pid))
        started += list(pids)  # the Flower processes below the guards: their SuperExecs name them
        for pid in _started_for(started):
            pids.add(pid)
            pids.update(descendants(pid))
        groups = {p.popen.pid for p in self.processes}  # start_new_session: each guard leads its own group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pgid in groups:
                _signal_group(pgid, sig)
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for p in self.processes:
                    p.popen.poll()  # reap our direct children so they do not linger as zombies
                if not any(_exists(pid) for pid in pids):
                    break
                time.sleep(0.1)
            if not any(_exists(pid) for pid in pids):
                break
        for p in self.processes:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _LIVE.discard(self)  # stopped: the atexit hook must not signal pids that may have been reused since
        return sorted(pid for pid in pids if _exists(pid))

    # ---------------------------------------------------------------------------------- SuperLink

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the SuperLink is not started")
        return f"{self.host}:{self.port}"

    def start_superlink(self, port: int | None = None, timeout: float = 60.0) -> Process:
        """Start the SuperLink (TLS + node auth when certificates were given) and write the connection."""
        self.port = port or free_port(self.host)
        args = [executable("flower-superlink"), "--host", self.host, "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--isolation", self.isolation]
        if self.certs is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                     "--ssl-keyfile", str(self.certs.server_key)]
            if self.auth:
                args.append("--enable-supernode-auth")
        process = self._spawn("superlink", args)
        write_connection(self.connection, self.address, home=self.home, default=True,
                         root_certificates=self.certs.ca_cert if self.certs else None, insecure=self.certs is None)
        self._wait_listening(process, timeout)
        return process

    def _wait_listening(self, process: Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise RunError(f"{process.name} exited {process.popen.returncode}: {_first_line(process.tail(5))}")
            try:
                with socket.create_connection((self.host, int(self.port)), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RunError(f"{process.name} does not listen on {self.address} after {timeout:.0f} s")

    def register(self, public_key: Path, name: str | None = None) -> int:
        """`flwr supernode register KEY.pub CONN`; returns the node id the SuperLink assigned."""
        args = [executable("flwr"), "supernode", "register", str(public_key), self.connection, "--format", "json"]
        if name:
            args += ["--name", name]
        proc = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=120,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0 and "{" not in proc.stdout:
            raise RunError(f"flwr supernode register exited {proc.returncode}: {_first_line(proc.stderr + proc.stdout)}")
        data = parse_json_output(proc.stdout, "flwr supernode register")
        return int(data["node-id"])

    # ---------------------------------------------------------------------------------- SuperNodes

    def start_supernode(self, name: str, node_config: Mapping[str, Any], *, key: Path | None = None,
                        port: int | None = None, extra_args: tuple[str, ...] = ()) -> Process:
        """A SuperNode with its own ClientAppIo port and node config (and private key under node auth)."""
        args = [executable("flower-supernode"), "--superlink", self.address, "--host", self.host,
                "--port", str(port or free_port(self.host)), "--isolation", self.isolation,
                "--node-config", node_config_arg(node_config)]
        if self.certs is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certs.ca_cert)]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        return self._spawn(name, [*args, *extra_args])


def _started_for(parents: list[int]) -> list[int]:
    """Processes whose command line says `--parent-pid P` for one of `parents` (Flower's SuperExec)."""
    wanted = {str(p) for p in parents}
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == b"--parent-pid" and args[i + 1].decode(errors="replace") in wanted:
                found.append(int(entry.name))
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["HOST", "LocalFederation", "Process", "descendants", "free_port", "node_config_arg"]
