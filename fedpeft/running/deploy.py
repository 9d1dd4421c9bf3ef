"""A real Flower deployment on this machine: one SuperLink and N SuperNodes as processes.

:func:`deploy` validates the run config first (a bad key fails before any process
starts), starts ``flower-superlink`` and one SuperNode per partition on loopback with free
ports (``--insecure``, or TLS with a CA and server certificate made on the fly), writes the
connection into ``$FLWR_HOME/config.toml``, runs the same ServerApp / ClientApp as the
simulation with ``flwr run <app> <connection> --stream``, and checks the run's final
status, since ``flwr run --stream`` exits 0 even when the run failed.  Every process it
started is stopped by its PID on the way out, also after an error or Ctrl-C.

The SuperNodes run through :mod:`fedpeft.running.deploy_probe`, which logs what crossed the Fleet
API, so a deployment also measures its traffic (:func:`fedpeft.running.deploy_probe.compare_traffic`).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedpeft.config import ConfigError, ConfigValue
from fedpeft.running.deploy_probe import TrafficReport, compare_traffic
from fedpeft.running.launch import app_dir, resolve_config

HOST = "127.0.0.1"  # every process listens here only
CONNECTION = "fedpeft-deploy"


class DeploymentError(RuntimeError):
    """A Flower process failed to start, or the run did not finish as completed."""


# ---------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Certificates:
    """A CA and a server certificate signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(folder: str | Path, days: int = 2) -> Certificates:
    """A fresh CA and a server certificate for ``localhost`` / 127.0.0.1 / ::1 in ``folder``.

    Short-lived and made per deployment: nothing secret outlives the run's temp folder.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedpeft deploy CA"))
        .issuer_name(name("fedpeft deploy CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certificates(out / "ca.pem", out / "server.pem", out / "server.key")
    certs.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certs.server_key.chmod(0o600)
    return certs


# ---------------------------------------------------------------- environment
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: a private FLWR_HOME, no telemetry, no reinstalls."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ) | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """The ``[superlink.<name>]`` table that points ``flwr`` at our SuperLink."""
    lines = [f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    return "\n".join(lines) + "\n"


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with our connection (the folder is ours alone)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(connection_toml(address, root_certificates))
    return path


# ---------------------------------------------------------------- processes
@dataclass
class Started:
    """One process we started, and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (pid {self.proc.pid}, {self.log}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


def _tool(name: str) -> str:
    """A Flower executable installed next to this Python."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} is not installed next to {sys.executable}")
    return found


def stop(started: Started, grace: float = 10.0) -> None:
    """Stop one process we started and every process it started, by PID."""
    import psutil

    try:
        parent = psutil.Process(started.proc.pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        started.proc.wait(timeout=grace)


def wait_listening(port: int, started: Started, timeout: float) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise DeploymentError(f"{started.name} exited with {started.proc.returncode}\n{started.tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(
        f"{started.name} did not listen on {HOST}:{port} within {timeout:.0f} s\n{started.tail()}"
    )


# ---------------------------------------------------------------- deployment
@dataclass
class Deployment:
    """A SuperLink and ``supernodes`` SuperNodes on loopback; a context manager that stops them."""

    supernodes: int
    work_dir: Path
    tls: bool = False
    start_timeout: float = 60.0
    started: list[Started] = field(default_factory=list)
    port: int = 0
    certs: Certificates | None = None

    @property
    def flwr_home(self) -> Path:
        return self.work_dir / "flwr-home"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def probe_logs(self) -> list[Path]:
        return [self.work_dir / f"fleet-probe-{i}.jsonl" for i in range(self.supernodes)]

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def __enter__(self) -> Deployment:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process we started: SuperNodes first, then the SuperLink."""
        for started in reversed(self.started):
            stop(started)

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.started]

    def tails(self) -> str:
        return "\n".join(s.tail() for s in self.started)

    def _spawn(self, name: str, argv: list[str]) -> Started:
        log = self.work_dir / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=self.work_dir
            )
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def _tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        return ["--root-certificates", str(self.certs.ca_cert)]

    def _start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_certificates(self.work_dir / "certs")
        self.port = free_port()
        write_connection(self.flwr_home, self.address, self.certs.ca_cert if self.certs else None)
        link = self._spawn(
            "superlink",
            [
                _tool("flower-superlink"),
                *self._tls_args(server=True),
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--database",
                str(self.work_dir / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_listening(self.port, link, self.start_timeout)
        for i, probe_log in enumerate(self.probe_logs):
            self._spawn(
                f"supernode-{i}",
                [
                    sys.executable,
                    "-m",
                    "fedpeft.running.deploy_probe",
                    "--probe-log",
                    str(probe_log),
                    *self._tls_args(server=False),
                    "--superlink",
                    self.address,
                    "--host",
                    HOST,
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={self.supernodes}",
                ],
            )

    def flwr_run(self, overrides: Mapping[str, ConfigValue], timeout: float) -> int:
        """``flwr run <app> <connection> --stream -c ...``; returns the run id."""
        flwr = _tool("flwr")
        config = " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())
        argv = [flwr, "run", str(app_dir()), CONNECTION, "--stream", "-c", config]
        log = self.work_dir / "flwr-run.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=self.work_dir
            )
            started = Started("flwr-run", proc, log)
            self.started.append(started)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                raise DeploymentError(
                    f"flwr run did not finish within {timeout:.0f} s\n{self.tails()}"
                ) from err
        match = re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
        if proc.returncode != 0 or match is None:
            raise DeploymentError(f"flwr run failed (exit {proc.returncode})\n{self.tails()}")
        return int(match.group(1))

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr list`` reports it (``finished:completed`` when it worked)."""
        out = subprocess.run(
            [_tool("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.work_dir,
            timeout=60,
        )
        try:
            runs = json.loads(out.stdout)["runs"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DeploymentError(
                f"flwr list gave no run list: {out.stdout[-500:]}{out.stderr[-500:]}"
            ) from err
        return str(runs[0]["status"]) if runs else "unknown"


def _toml_value(value: ConfigValue) -> str:
    """A run-config value as ``flwr run -c`` parses it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


# ---------------------------------------------------------------- one call
@dataclass(frozen=True)
class DeployResult:
    """What a deployment produced and how long it took."""

    run_dir: Path
    run_id: int
    status: str
    wall_seconds: float
    traffic: TrafficReport
    work_dir: Path


def deploy(
    overrides: Mapping[str, ConfigValue] | None = None,
    *,
    supernodes: int | None = None,
    tls: bool = False,
    work_dir: str | Path | None = None,
    timeout: float = 1800.0,
) -> DeployResult:
    """Run one experiment on a real SuperLink + SuperNodes; returns its results.

    ``supernodes`` defaults to ``num-clients`` and must equal it: each node serves one
    partition (``--node-config partition-id=i num-partitions=N``).  Logs of every
    process and the probes' traffic logs go to ``work_dir`` (a temp folder by default).
    """
    cfg, final = resolve_config(dict(overrides or {}))  # a bad key fails here, before any process
    nodes = cfg.num_clients if supernodes is None else supernodes
    if nodes != cfg.num_clients:
        raise ConfigError(
            f"--supernodes {nodes} but num-clients={cfg.num_clients}: each SuperNode serves one "
            f"partition, so start as many as num-clients (or --set num-clients={nodes})"
        )
    from fedpeft.results.records import run_dir_for

    run_dir = run_dir_for(cfg)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedpeft-deploy-"))
    t0 = time.perf_counter()
    with Deployment(nodes, work.resolve(), tls=tls) as dep:
        run_id = dep.flwr_run(final, timeout)
        status = dep.run_status(run_id)
        if status != "finished:completed" or not (run_dir / "rounds.jsonl").is_file():
            raise DeploymentError(f"run {run_id} ended as {status!r} (results: {run_dir})\n{dep.tails()}")
    wall = time.perf_counter() - t0
    return DeployResult(run_dir, run_id, status, wall, compare_traffic(run_dir, dep.probe_logs), work)
