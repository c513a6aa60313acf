"""`cutfl certs`, `cutfl connect` and `cutfl run`: deployment on Flower's Deployment Engine (docs/DEPLOYMENT.md).

Registration only imports argparse; `deploy/` (and with it `cryptography` and the `flwr` CLI) is imported
when a command runs, so `import cut` and `cutfl --help` stay light and Flower-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cutfl.args import int_at_least, positive_float


class RunFailed(ValueError):
    """The run did not finish as completed: cutfl/cli.py prints it as one line and exits 1."""


def add_commands(sub, parser_class=argparse.ArgumentParser) -> None:
    p = sub.add_parser("certs", help="TLS certificates for a SuperLink and SuperNode authentication keys",
                       description="Write a CA, a SuperLink certificate for --host (plus localhost, 127.0.0.1, "
                                   "::1) and --nodes ECDSA P-384 key pairs in OpenSSH format for SuperNode "
                                   "authentication. Private keys are written with mode 0600.")
    p.add_argument("--host", required=True, help="the SuperLink's DNS name or IP address, as SuperNodes dial it")
    p.add_argument("--out", type=Path, required=True, help="directory to write the files to")
    p.add_argument("--nodes", type=int_at_least(0), default=0, help="number of SuperNode key pairs (node-0 ...)")
    p.add_argument("--extra-host", action="append", default=[], metavar="NAME",
                   help="another name or address for the certificate (repeatable)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("connect", help="write a SuperLink connection into $FLWR_HOME/config.toml",
                       description="Add or replace [superlink.NAME] in $FLWR_HOME/config.toml (default ~/.flwr), "
                                   "the file flwr reads its connections from.")
    p.add_argument("name", help="connection name")
    p.add_argument("--address", required=True, help="the SuperLink's HOST:PORT")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="the CA certificate that signed the SuperLink's (TLS)")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (loopback / lab only)")
    p.add_argument("--default", action="store_true", help="also make it the default connection")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("run", help="run the federation on a SuperLink and wait for its final status",
                       description="`flwr run` the cut-fl app on the SuperLink named CONNECTION (from "
                                   "$FLWR_HOME/config.toml; `local` is Flower's local simulation, sized to the "
                                   "scenario), print the run's log as it goes, then its summary (devices ok, "
                                   "delta_m). Exits 0 only when the run finished as completed with the federation "
                                   "ok; otherwise one line and exit 1.")
    p.add_argument("connection", help="SuperLink connection name in $FLWR_HOME/config.toml (default ~/.flwr)")
    p.add_argument("--scenario", help="scenario name or TOML path (paths are read by the ServerApp, on the "
                                      "SuperLink's machine; a relative path is made absolute here)")
    p.add_argument("--base-model", type=Path, help="pre-trained model directory (read by the ServerApp)")
    p.add_argument("--out", type=Path, help="report directory (written by the ServerApp)")
    p.add_argument("--devices", type=int_at_least(1), help="number of SuperNodes to wait for (default: scenario's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run directory's federation (devices that reported do not score again)")
    p.add_argument("--app", type=Path, help="the Flower app directory (default: this cut-fl checkout)")
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds to wait for the run (then stop it)")
    p.add_argument("--poll", type=positive_float, default=3.0, help="seconds between status checks")
    p.add_argument("--quiet", action="store_true", help="do not print the run's log (per-phase progress) as it goes")
    p.add_argument("--address", help="write/replace CONNECTION with this SuperLink address (HOST:PORT) first")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", type=Path, help="with --address: the CA certificate (TLS)")
    tls.add_argument("--insecure", action="store_true", help="with --address: plain HTTP (lab use only)")
    p.set_defaults(func=cmd_run)


def cmd_certs(args: argparse.Namespace) -> int:
    from deploy.certs import generate, san_names

    certs = generate(args.out, args.host, nodes=args.nodes, extra_hosts=tuple(args.extra_host))
    out = {
        "ca_cert": str(certs.ca_cert), "ca_key": str(certs.ca_key),
        "server_cert": str(certs.server_cert), "server_key": str(certs.server_key),
        "server_names": san_names(certs.server_cert),
        "node_keys": [str(k) for k in certs.node_keys],
        "node_public_keys": [str(certs.node_public(i)) for i in range(len(certs.node_keys))],
    }
    print(json.dumps(out, indent=2))
    print(f"cutfl certs: keep {certs.ca_key.name} offline; give each device its node-N key and {certs.ca_cert.name}",
          file=sys.stderr)
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from deploy.flwr_run import write_connection

    path = write_connection(args.name, args.address, root_certificates=args.root_certificates,
                            insecure=args.insecure, default=args.default)
    print(f"cutfl connect: {args.name} -> {args.address} ({'insecure' if args.insecure else 'TLS'}) in {path}",
          file=sys.stderr)
    return 0


def default_app_dir() -> Path:
    """The checkout this cut-fl runs from (its pyproject.toml declares the Flower app), else the cwd."""
    checkout = Path(__file__).resolve().parent.parent
    pyproject = checkout / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
        return checkout
    return Path.cwd()


def run_config(args: argparse.Namespace) -> dict:
    config: dict = {}
    if args.scenario:
        scenario = Path(args.scenario)
        config["scenario"] = str(scenario.resolve()) if scenario.suffix == ".toml" or scenario.exists() else args.scenario
    if args.base_model:
        config["base-model"] = str(args.base_model.resolve())
    if args.out:
        config["out-dir"] = str(args.out.resolve())
    if args.devices:
        config["devices"] = args.devices
    if args.resume:
        config["resume"] = True
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from deploy.flwr_run import (
        RunError,
        describe,
        is_local_simulation,
        report_summary,
        run_and_wait,
        run_logs,
        write_connection,
    )

    if (args.root_certificates or args.insecure) and not args.address:
        raise ValueError("--root-certificates / --insecure only go with --address")
    if args.address:
        if not (args.root_certificates or args.insecure):
            raise ValueError("--address needs --root-certificates CA (TLS) or --insecure")
        path = write_connection(args.connection, args.address, root_certificates=args.root_certificates,
                                insecure=args.insecure)
        print(f"cutfl run: connection {args.connection!r} -> {args.address} written to {path}", file=sys.stderr)
    app = (args.app or default_app_dir()).resolve()
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app}: no pyproject.toml (pass --app, the cut-fl checkout)")
    federation = None
    if is_local_simulation(args.connection):  # Flower's local simulation: one simulated SuperNode per device
        # one CPU per device call, as `cutfl simulate` (Flower's default is 2: half the devices at once)
        federation = {"num-supernodes": args.devices or scenario_devices(args.scenario), "client-resources-num-cpus": 1}
        print(f"cutfl run: {args.connection!r} is a local simulation SuperLink: {federation['num-supernodes']} "
              f"simulated SuperNodes", file=sys.stderr)
    follow = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    try:
        result = run_and_wait(app, args.connection, run_config(args), timeout=args.timeout, poll=args.poll,
                              federation_config=federation, on_log=follow)
    except RunError as e:
        raise RunFailed(str(e)) from None
    if not result.ok:  # a stopped or failed run has no summary worth a further call to the SuperLink
        raise RunFailed(describe(result))
    summary = report_summary(run_logs(args.connection, result.run_id)) or {}
    print(json.dumps({"run_id": result.run_id, "status": result.status, "seconds": round(result.seconds, 1),
                      **{k: summary.get(k) for k in RUN_SUMMARY_KEYS}, **run_config(args)}, indent=2))
    if summary.get("status") not in (None, "ok"):  # completed, but too few devices for the scenario's min_devices
        raise RunFailed(f"run {result.run_id} completed, but only {summary.get('devices_ok')} of "
                        f"{summary.get('devices_expected')} devices finished (report: {summary.get('report')})")
    return 0


RUN_SUMMARY_KEYS = ("devices_ok", "devices_expected", "devices_rejected", "devices_failed", "delta_m_mean",
                    "delta_m_ci95", "report")


def scenario_devices(scenario: str | None) -> int:
    """The device count of a scenario (name or path; the default scenario when None)."""
    from server.settings import load_settings

    return load_settings(scenario or "default").devices
