"""Start a run on a SuperLink with `flwr run`, then wait for its *final* status.

`flwr run` exits 0 as soon as the SuperLink accepted the run, whatever happens to it afterwards (and, with
`--format json`, even when it could not start it: the JSON then says `"success": false`). So this module
reads the run id from `flwr run ... --format json`, polls `flwr ls CONN --run-id ID --format json` until
the run's status is `finished:*`, and reports `finished:completed` as success and anything else
(`finished:failed`, `finished:stopped`, a timeout, an error from the CLI) as failure.

Connections live in `$FLWR_HOME/config.toml` (default `~/.flwr`), not in pyproject.toml (Flower 1.41):

    [superlink]
    default = "my-link"            # optional

    [superlink.my-link]
    address = "superlink.example.org:9093"
    root-certificates = "/abs/path/ca.crt"   # TLS (the default); must be an absolute path
    # insecure = true                        # instead of root-certificates: plain HTTP, lab use only

`write_connection` writes such an entry. The `flwr` executables are taken from the directory of the
running interpreter first (a venv whose bin/ is not on PATH), then from PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPLETED = "finished:completed"
FINISHED = "finished"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class RunError(Exception):
    """The run could not be started, failed, was stopped, or did not finish in time (one-line message)."""


# ------------------------------------------------------------------------------------ executables


def bin_dir() -> Path:
    """The directory of the running interpreter's scripts (venv/bin), where flwr's commands live."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """Path of a Flower command: next to sys.executable first, then on PATH."""
    candidate = bin_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RunError(f"`{name}` not found next to {sys.executable} or on PATH: install flwr in this environment")


def flwr_env(flwr_home: Path | str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: venv bin/ first on PATH (SuperLink and SuperNode start
    `flower-superexec` by name), FLWR_HOME if given, plain (uncoloured, unwrapped) CLI output, and no
    update check (Flower's background request would hold every short `flwr` call on a machine offline)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")]).rstrip(os.pathsep)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["NO_COLOR"] = "1"
    env.setdefault("COLUMNS", "200")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # A local simulation SuperLink that `flwr run` starts inherits this: it then runs the app in this environment
    # instead of installing the app's dependencies (torch...) into a fresh one for every run.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env


# ------------------------------------------------------------------------------------ connections


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["FLWR_HOME"]) if env.get("FLWR_HOME") else Path.home() / ".flwr"


def write_connection(name: str, address: str, *, root_certificates: Path | str | None = None,
                     insecure: bool = False, home: Path | str | None = None, default: bool = False) -> Path:
    """Add or replace `[superlink.NAME]` in `$FLWR_HOME/config.toml`; returns the file's path.

    TLS needs `root_certificates` (the CA that signed the SuperLink's certificate; stored as an absolute
    path, as Flower requires); `insecure=True` is plain HTTP. Other entries of the file are kept.
    """
    import tomli_w  # a Flower dependency

    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == "default":
        raise ValueError(f"connection name {name!r}: use letters, digits, '-', '_' or '.' (not 'default')")
    if insecure == (root_certificates is not None):
        raise ValueError(f"connection {name!r}: give either root certificates (TLS) or insecure, not both/neither")
    path = (Path(home) if home is not None else flwr_home()) / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        cert = Path(root_certificates).expanduser().resolve()
        if not cert.is_file():
            raise FileNotFoundError(f"root certificates {cert} not found")
        entry["root-certificates"] = str(cert)
    else:
        entry["insecure"] = True
    links[name] = entry
    if default:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


# ------------------------------------------------------------------------------------ CLI output


def parse_json_output(text: str, command: str) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (colour codes and stray lines tolerated)."""
    clean = _ANSI.sub("", text).strip()
    start = clean.find("{")
    if start < 0:
        raise RunError(f"`{command}` printed no JSON: {_first_line(clean) or '(nothing)'}")
    try:
        data, _ = json.JSONDecoder().raw_decode(clean[start:])
    except json.JSONDecodeError as e:
        raise RunError(f"`{command}` printed malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise RunError(f"`{command}` printed JSON that is not an object")
    if data.get("success") is False:  # error-message = the command's captured output, then the error
        raise RunError(f"`{command}` failed: {_last_line(str(data.get('error-message', ''))) or 'no reason given'}")
    return data


def run_id_from_output(text: str) -> int:
    """The run id from `flwr run ... --format json` (`{"success": true, "run-id": "123", ...}`)."""
    data = parse_json_output(text, "flwr run")
    try:
        return int(data["run-id"])
    except (KeyError, TypeError, ValueError):
        raise RunError(f"`flwr run` gave no run id: {json.dumps(data)[:200]}") from None


def status_from_output(text: str, run_id: int) -> tuple[str, str]:
    """(status, details) of `run_id` from `flwr ls CONN --run-id ID --format json`."""
    data = parse_json_output(text, "flwr ls")
    for run in data.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", "") or "")
    raise RunError(f"`flwr ls` does not list run {run_id}")


def is_finished(status: str) -> bool:
    return status.split(":", 1)[0] == FINISHED


def _last_line(text: str) -> str:
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


# ------------------------------------------------------------------------------------ running


def check_connection(connection: str, env: Mapping[str, str] | None = None) -> None:
    """Fail with one clear line when `connection` is not in $FLWR_HOME/config.toml."""
    path = flwr_home(env) / "config.toml"
    try:
        links = tomllib.loads(path.read_text()).get("superlink", {}) if path.is_file() else FLOWER_DEFAULT_LINKS
    except tomllib.TOMLDecodeError as e:
        raise RunError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(links.get(connection), dict):
        raise RunError(f"no SuperLink connection {connection!r} in {path} (add it with `cutfl connect "
                       f"{connection} --address HOST:PORT --root-certificates CA`)")


LOCAL_ADDRESSES = (":local:", ":local-in-memory:")  # Flower starts a local simulation SuperLink for these
# What the first `flwr` command writes into a missing $FLWR_HOME/config.toml (Flower 1.41): a `local` simulation.
FLOWER_DEFAULT_LINKS: dict[str, Any] = {"default": "local", "local": {"address": ":local:"}}


def is_local_simulation(connection: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether CONNECTION is Flower's local simulation SuperLink (address `:local:`), where `flwr run` needs the
    number of simulated SuperNodes (`--federation-config num-supernodes=N`; Flower's default is 2)."""
    path = flwr_home(env) / "config.toml"
    try:
        links = tomllib.loads(path.read_text()).get("superlink", {}) if path.is_file() else FLOWER_DEFAULT_LINKS
    except tomllib.TOMLDecodeError:
        return False
    entry = links.get(connection)
    return isinstance(entry, dict) and entry.get("address") in LOCAL_ADDRESSES


def config_value(key: str, value: Any, what: str = "run config") -> str:
    """One `key=value` of a Flower config argument (--run-config, --node-config): values as TOML, strings
    quoted (Flower matches '...' or "..." and parses the pairs as TOML)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        value = str(value)
        if "'" not in value:
            text = f"'{value}'"  # TOML literal string: no escapes to worry about
        elif '"' not in value and "\\" not in value:
            text = f'"{value}"'
        else:
            raise ValueError(f"{what} {key}: a value holding ' together with \" or \\ cannot be passed to flwr")
    return f"{key}={text}"


def run_config_args(run_config: Mapping[str, Any]) -> list[str]:
    """`--run-config` arguments, one per key."""
    args: list[str] = []
    for key, value in run_config.items():
        args += ["--run-config", config_value(key, value)]
    return args


def _flwr(args: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([executable("flwr"), *args], capture_output=True, text=True, env=dict(env),
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None


def start_run(app_dir: Path | str, connection: str, run_config: Mapping[str, Any] | None = None, *,
              env: Mapping[str, str] | None = None, timeout: float = 120.0,
              federation_config: Mapping[str, Any] | None = None) -> int:
    """`flwr run APP CONN --run-config ... [--federation-config ...] --format json`; returns the run id.

    `federation_config`: simulation settings for a simulation SuperLink (e.g. `{"num-supernodes": 20}`)."""
    env = flwr_env() if env is None else env
    check_connection(connection, env)
    federation = [f"{k}={v}" for k, v in (federation_config or {}).items()]
    extra = ["--federation-config", " ".join(federation)] if federation else []
    proc = _flwr(["run", str(app_dir), connection, *run_config_args(run_config or {}), *extra, "--format", "json"],
                 env, timeout)
    if proc.returncode != 0 and "{" not in proc.stdout:
        raise RunError(f"`flwr run` exited {proc.returncode}: {_first_line(proc.stderr or proc.stdout)}")
    return run_id_from_output(proc.stdout)


def run_status(connection: str, run_id: int, *, env: Mapping[str, str] | None = None,
               timeout: float = 60.0) -> tuple[str, str]:
    env = flwr_env() if env is None else env
    proc = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env, timeout)
    if proc.returncode != 0 and "{" not in proc.stdout:
        raise RunError(f"`flwr ls` exited {proc.returncode}: {_first_line(proc.stderr or proc.stdout)}")
    return status_from_output(proc.stdout, run_id)


def stop_run(connection: str, run_id: int, *, env: Mapping[str, str] | None = None) -> None:
    """Best effort `flwr stop ID CONN` (after a timeout, so the run does not go on unattended)."""
    try:
        _flwr(["stop", str(run_id), connection, "--format", "json"], flwr_env() if env is None else env, 60.0)
    except RunError:
        pass


def run_logs(connection: str, run_id: int, *, env: Mapping[str, str] | None = None) -> str:
    """The run's logs so far (`flwr log ID CONN --show`), for diagnosing a failed run."""
    try:
        proc = _flwr(["log", str(run_id), connection, "--show"], flwr_env() if env is None else env, 60.0)
    except RunError as e:
        return str(e)
    return _ANSI.sub("", proc.stdout + proc.stderr)


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str  # finished:completed, finished:failed, finished:stopped, or the last status seen (timeout)
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def wait_for_run(connection: str, run_id: int, *, timeout: float = 3600.0, poll: float = 2.0,
                 env: Mapping[str, str] | None = None, stop_on_timeout: bool = True,
                 max_errors: int = 3, on_log: Callable[[str], None] | None = None) -> RunResult:
    """Poll the run's status until it is finished or `timeout` seconds passed (then stop it).

    A status query that fails (SuperLink briefly unreachable) is retried; `max_errors` failures in a row
    end the wait with that error. `on_log`: called with each line of the run's log as it arrives (`flwr log
    --stream`: the ServerApp's per-phase progress, one line per device), from a reader thread.
    """
    start = time.monotonic()
    status, details, errors = "", "", 0
    with LogFollower(connection, run_id, on_log, env=env):
        while True:
            try:
                status, details = run_status(connection, run_id, env=env)
                errors = 0
            except RunError:
                errors += 1
                if errors >= max_errors:
                    raise
            if is_finished(status):
                return RunResult(run_id, status, details, time.monotonic() - start)
            if time.monotonic() - start > timeout:
                if stop_on_timeout:
                    stop_run(connection, run_id, env=env)
                return RunResult(run_id, f"timeout:{status or 'unknown'}", f"not finished after {timeout:.0f} s",
                                 time.monotonic() - start)
            time.sleep(poll)


class LogFollower:
    """`flwr log RUN CONN --stream` in the background, each clean line handed to `on_line` (nothing when None).

    The follower runs in its own process group and is stopped (SIGTERM, then SIGKILL) when the context ends."""

    def __init__(self, connection: str, run_id: int, on_line: Callable[[str], None] | None, *,
                 env: Mapping[str, str] | None = None) -> None:
        self.command = [executable("flwr"), "log", str(run_id), connection, "--stream"] if on_line else None
        self.on_line, self.env = on_line, dict(flwr_env() if env is None else env)
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> LogFollower:
        if self.command is None:
            return self
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.thread = threading.Thread(target=self._read, name="flwr-log", daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = _ANSI.sub("", raw).rstrip()
            if line.strip() and self.on_line is not None:
                self.on_line(line)

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        if self.thread is not None:
            self.thread.join(timeout=5)


# The ServerApp's last log line (server.report.SUMMARY_PREFIX, not imported: deploy stays torch-free).
SUMMARY_PREFIX = "cutfl report: "


def report_summary(log_text: str) -> dict[str, Any] | None:
    """The federation's summary from its log (the last `cutfl report: {...}` line), or None when absent."""
    for line in reversed(_ANSI.sub("", log_text).splitlines()):
        at = line.find(SUMMARY_PREFIX)
        if at < 0:
            continue
        try:
            value = json.loads(line[at + len(SUMMARY_PREFIX):].strip())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_and_wait(app_dir: Path | str, connection: str, run_config: Mapping[str, Any] | None = None, *,
                 timeout: float = 3600.0, poll: float = 2.0, env: Mapping[str, str] | None = None,
                 federation_config: Mapping[str, Any] | None = None,
                 on_log: Callable[[str], None] | None = None) -> RunResult:
    """Start the run and wait for its final status (check `.ok`; `describe` gives a one-line summary)."""
    run_id = start_run(app_dir, connection, run_config, env=env, federation_config=federation_config)
    return wait_for_run(connection, run_id, timeout=timeout, poll=poll, env=env, on_log=on_log)


def describe(result: RunResult) -> str:
    """One line: `run 7 finished:failed after 31 s (details)`."""
    extra = f" ({_first_line(result.details)})" if result.details.strip() else ""
    return f"run {result.run_id} {result.status} after {result.seconds:.0f} s{extra}"


def exit_code(result: RunResult) -> int:
    """0 only for finished:completed."""
    return 0 if result.ok else 1


__all__ = [
    "COMPLETED", "SUMMARY_PREFIX", "LogFollower", "RunError", "RunResult", "report_summary", "check_connection", "describe", "executable", "exit_code", "flwr_env", "flwr_home",
    "is_finished", "is_local_simulation", "parse_json_output", "run_and_wait", "config_value", "run_config_args", "run_id_from_output", "run_logs",
    "run_status", "start_run", "status_from_output", "stop_run", "wait_for_run", "write_connection",
]
