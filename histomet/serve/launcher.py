"""Start, wait for and stop the embedded ``tritonserver`` on 127.0.0.1.

The embedded default server is the ``tritonserver`` binary that the PyPI wheel
``nvidia-pytriton`` ships (Triton 2.51, Python backend only). The wheel does not
lay the binary out ready to run, so :func:`prepare_backend_dir` assembles a
backend directory with the Python backend stub that matches this interpreter, and
:func:`server_environment` puts this interpreter's library directory and the
wheel's bundled libraries on ``LD_LIBRARY_PATH``. The stub runs models with the
first ``python3`` on ``PATH``, so this environment's ``bin`` goes first.

The server binds every endpoint to 127.0.0.1 unless ``ServerConfig.address``
says otherwise. ``ServerConfig.tls`` serves gRPC over TLS (mutual TLS when a
client CA is given). With an admin key (``ServerConfig.admin_key``, by default
from ``HISTOMET_TRITON_ADMIN_KEY``), the endpoints that change the server
(model load and unload, the repository index, shared-memory registration,
trace and log settings) accept only requests that carry the key: the header
``admin-key: KEY`` over HTTP, and ``triton-grpc-protocol-admin-key: KEY`` over
gRPC, where Triton 2.51 adds that prefix (``grpc_admin_headers``; flags
``--http-restricted-api`` and ``--grpc-restricted-protocol``); inference, health, metadata and
model configs stay open.

``ServerConfig.external`` runs another ``tritonserver`` build instead, such as the
NGC container's, which has the ONNX Runtime and TensorRT backends that the ``gpu``
target needs. :func:`find_external_server` locates one from ``HISTOMET_TRITONSERVER``
or the NGC container's ``/opt/tritonserver``.

Usage::

    with LocalTritonServer(ServerConfig(repository=Path("model_repository"))) as server:
        print(server.grpc_url)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from histomet.errors import ServerUnavailableError
from histomet.spec import ENSEMBLE_MODEL

_LOGGER = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Triton waits this long for in-flight requests when asked to stop; the
# launcher's own limit before SIGKILL leaves it a margin.
EXIT_TIMEOUT_S = 20
STOP_TIMEOUT_S = 40.0
ADMIN_KEY_ENV = "HISTOMET_TRITON_ADMIN_KEY"
# The header name Triton checks for the restricted protocols, and the groups
# restricted: every endpoint group that changes the server's state.
ADMIN_KEY_HEADER = "admin-key"
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
TRITONSERVER_ENV = "HISTOMET_TRITONSERVER"
BACKEND_DIR_ENV = "HISTOMET_TRITON_BACKEND_DIR"
# The server binary's path in the NGC tritonserver container.
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


@dataclass(frozen=True)
class ExternalServer:
    """A ``tritonserver`` binary and backend directory installed outside this environment."""

    binary: Path
    backend_dir: Path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for gRPC over TLS; ``client_ca`` turns on mutual TLS."""

    server_cert: Path
    server_key: Path
    client_ca: Path | None = None


def grpc_admin_headers(admin_key: str) -> dict[str, str]:
    """Return the gRPC headers that unlock the restricted endpoints."""
    return {f"triton-grpc-protocol-{ADMIN_KEY_HEADER}": admin_key}


def _admin_key_from_environment() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None


def admin_headers(admin_key: str | None = None) -> dict[str, str] | None:
    """Return the admin headers for ``admin_key``, else for ``$HISTOMET_TRITON_ADMIN_KEY``.

    Returns None when neither is set, for a server without an admin key.
    """
    key = admin_key or _admin_key_from_environment()
    return grpc_admin_headers(key) if key else None


@dataclass(frozen=True)
class ServerConfig:
    """Settings for one local ``tritonserver`` process."""

    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = LOOPBACK
    startup_timeout_s: float = 180.0
    log_verbose: int = 0
    # Explicit model control with every model loaded at start, so that later
    # load and unload calls (promote, rollback) work against the same server.
    load_models: tuple[str, ...] = ("*",)
    tls: TlsFiles | None = None
    # NOTE: Triton takes the key only on its command line, so other users of
    # this host can read it from /proc. Run the server as its own user.
    admin_key: str | None = field(default_factory=_admin_key_from_environment)
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # None runs the embedded server from nvidia-pytriton.
    external: ExternalServer | None = None


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailableError(
            "the nvidia-pytriton package is not installed",
            "install HistoMet with its dependencies: pip install -e .",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    """Return the path of the ``tritonserver`` binary shipped in nvidia-pytriton."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerUnavailableError(
            f"tritonserver binary not found at {binary}",
            "reinstall nvidia-pytriton==0.7.0",
        )
    return binary


def prepare_backend_dir(cache_dir: Path | None = None) -> Path:
    """Assemble a Triton backend directory whose Python backend matches this interpreter.

    The directory is rebuilt only when the wheel's files are newer than the copy.
    """
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerUnavailableError(
            f"no Triton Python backend stub for Python {version} in nvidia-pytriton",
            "use Python 3.10 to 3.13",
        )
    if cache_dir is None:
        cache_dir = Path(
            os.environ.get("HISTOMET_CACHE_DIR", Path.home() / ".cache" / "histomet")
        )
    backend_dir = cache_dir / f"triton-backends-py{version}"
    python_dir = backend_dir / "python"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root
        / "backends"
        / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        target = python_dir / name
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        # Copy through a temporary name so a concurrent start never reads half a file.
        with tempfile.NamedTemporaryFile(dir=python_dir, delete=False) as handle:
            temporary = Path(handle.name)
        shutil.copy2(source, temporary)
        temporary.chmod(0o755)
        os.replace(temporary, target)
    return backend_dir


def find_external_server(
    backends: tuple[str, ...], environ: dict[str, str] | None = None
) -> ExternalServer:
    """Locate a ``tritonserver`` whose backend directory has every backend in ``backends``.

    The binary is ``$HISTOMET_TRITONSERVER`` when set, else the NGC container's
    ``/opt/tritonserver/bin/tritonserver``. The backend directory is
    ``$HISTOMET_TRITON_BACKEND_DIR`` when set, else ``backends`` next to the
    binary's ``bin``. A backend counts as present when its folder contains
    ``libtriton_<name>.so``, the library Triton loads for it. Raises
    ``ServerUnavailableError`` naming the path and variable that were checked.
    """
    env = os.environ if environ is None else environ
    configured = env.get(TRITONSERVER_ENV)
    binary = Path(configured) if configured else NGC_TRITONSERVER
    if not binary.is_file():
        where = (
            f"{binary} (from {TRITONSERVER_ENV})"
            if configured
            else f"{binary} ({TRITONSERVER_ENV} is not set, and this is the NGC "
            "container's path)"
        )
        raise ServerUnavailableError(
            f"tritonserver binary not found: {where}",
            f"run inside the NGC tritonserver container or set {TRITONSERVER_ENV} "
            "to the path of a tritonserver binary",
        )
    if not os.access(binary, os.X_OK):
        raise ServerUnavailableError(
            f"tritonserver binary {binary} is not executable",
            f"make it executable or set {TRITONSERVER_ENV} to another binary",
        )
    configured_dir = env.get(BACKEND_DIR_ENV)
    backend_dir = (
        Path(configured_dir) if configured_dir else binary.parent.parent / "backends"
    )
    where = (
        f"{backend_dir} (from {BACKEND_DIR_ENV})"
        if configured_dir
        else f"{backend_dir} (next to the binary; {BACKEND_DIR_ENV} is not set)"
    )
    if not backend_dir.is_dir():
        raise ServerUnavailableError(
            f"Triton backend directory not found: {where}",
            f"set {BACKEND_DIR_ENV} to the folder that contains the backends",
        )
    missing = [
        f"{name}/libtriton_{name}.so"
        for name in backends
        if not (backend_dir / name / f"libtriton_{name}.so").is_file()
    ]
    if missing:
        raise ServerUnavailableError(
            f"Triton backend directory {where} is missing {', '.join(missing)}",
            "run inside an NGC tritonserver image that ships these backends, or set "
            f"{BACKEND_DIR_ENV} to a directory that contains them",
        )
    return ExternalServer(binary=binary, backend_dir=backend_dir)


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment that lets the wheel's server and stub find their libraries."""
    env = dict(os.environ if base is None else base)
    library_dirs = [
        str(sysconfig.get_config_var("LIBDIR") or ""),
        str(_pytriton_root().parent / "nvidia_pytriton.libs"),
    ]
    if env.get("LD_LIBRARY_PATH"):
        library_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in library_dirs if d)
    # The stub starts the first python3 on PATH: it must be this environment's,
    # which has numpy < 2 and onnxruntime.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def server_command(config: ServerConfig, backend_dir: Path) -> list[str]:
    """Build the ``tritonserver`` command line for ``config``."""
    binary = config.external.binary if config.external else tritonserver_binary()
    command = [
        str(binary),
        # absolute(), not resolve(): a publish root serves through its "current"
        # symbolic link, which must be followed anew at each model load.
        f"--model-repository={config.repository.absolute()}",
        f"--backend-directory={backend_dir}",
        f"--grpc-address={config.address}",
        f"--grpc-port={config.grpc_port}",
        f"--http-address={config.address}",
        f"--http-port={config.http_port}",
        f"--metrics-address={config.address}",
        f"--metrics-port={config.metrics_port}",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        "--model-control-mode=explicit",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--log-verbose={config.log_verbose}",
    ]
    command += [f"--load-model={name}" for name in config.load_models]
    command += _security_args(config)
    command += list(config.extra_args)
    return command


def _security_args(config: ServerConfig) -> list[str]:
    """Return the TLS and restricted-protocol arguments of ``config``."""
    arguments = []
    if config.tls is not None:
        for path in (
            config.tls.server_cert,
            config.tls.server_key,
            config.tls.client_ca,
        ):
            if path is not None and not path.is_file():
                raise ServerUnavailableError(
                    f"TLS file not found: {path}", "give the path of a PEM file"
                )
        arguments += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={config.tls.server_cert.resolve()}",
            f"--grpc-server-key={config.tls.server_key.resolve()}",
        ]
        if config.tls.client_ca is not None:
            arguments += [
                f"--grpc-root-cert={config.tls.client_ca.resolve()}",
                "--grpc-use-ssl-mutual=true",
            ]
    if config.admin_key is not None:
        if not config.admin_key.strip() or any(c in config.admin_key for c in ",:= "):
            raise ServerUnavailableError(
                "the admin key is empty or contains one of ',', ':', '=' or a space",
                f"set {ADMIN_KEY_ENV} to a random token such as the output of "
                "`openssl rand -hex 32`",
            )
        protocols = ",".join(RESTRICTED_PROTOCOLS)
        restriction = f"{protocols}:{ADMIN_KEY_HEADER}={config.admin_key}"
        arguments += [
            f"--grpc-restricted-protocol={restriction}",
            f"--http-restricted-api={restriction}",
        ]
    return arguments


def _hide_admin_key(command: list[str]) -> list[str]:
    marker = f"{ADMIN_KEY_HEADER}="
    return [
        argument.split(marker)[0] + marker + "***" if marker in argument else argument
        for argument in command
    ]


def free_port(address: str = LOOPBACK) -> int:
    """Return a TCP port on ``address`` that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def check_ports_free(config: ServerConfig) -> None:
    """Raise if the ports repeat, or if any is already bound on the server's address.

    Without this check a second server fails to bind while the first one responds to
    the readiness probe, and the caller talks to the wrong server. The probe sets
    SO_REUSEADDR as Triton does, so sockets of a stopped server that linger in
    TIME_WAIT do not count as taken.
    """
    ports = {
        "gRPC": config.grpc_port,
        "HTTP": config.http_port,
        "metrics": config.metrics_port,
    }
    if len(set(ports.values())) != len(ports):
        raise ServerUnavailableError(
            "the gRPC, HTTP and metrics ports must differ, got "
            + ", ".join(f"{label} {port}" for label, port in ports.items()),
            "pass three different ports",
        )
    for label, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.address, port))
                probe.listen()
            except OSError as error:
                raise ServerUnavailableError(
                    f"{label} port {config.address}:{port} is already in use "
                    f"({error.strerror})",
                    f"stop the process that holds it (a server stopped moments ago "
                    f"may need up to {STOP_TIMEOUT_S:.0f} s) or pass another "
                    f"--{label.lower()}-port",
                ) from error


def check_repository(repository: Path) -> None:
    """Raise unless ``repository`` is a folder that contains the HistoMet ensemble."""
    if not repository.is_dir():
        raise ServerUnavailableError(
            f"model repository not found: {repository}",
            "build one with: histomet export demo --repository DIR",
        )
    from histomet.export.repository import interrupted_export_leftovers

    leftovers = [entry.name for entry in interrupted_export_leftovers(repository)]
    if leftovers:
        raise ServerUnavailableError(
            f"model repository {repository} contains {', '.join(leftovers)}, "
            "left by an interrupted export, so it may mix two exports",
            "run histomet export again, which removes them",
        )
    ensemble_config = repository / ENSEMBLE_MODEL / "config.pbtxt"
    if not ensemble_config.is_file():
        raise ServerUnavailableError(
            f"model repository {repository} has no {ENSEMBLE_MODEL!r} ensemble "
            f"({ensemble_config.relative_to(repository)} is missing)",
            "build one with: histomet export demo --repository DIR",
        )


def process_group_members(pgid: int) -> list[int]:
    """Return the pids whose process group is ``pgid``, read from /proc."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(stat_path.parent.name))
    return members


def _live_members(pgid: int) -> list[int]:
    """Return the members of process group ``pgid`` that are not zombies."""
    live = []
    for pid in process_group_members(pgid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            live.append(pid)
    return live


def _shared_memory_regions(pids: list[int]) -> list[Path]:
    """Return the /dev/shm regions named on the command lines of Python-backend stubs."""
    regions = []
    for pid in pids:
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for argument in arguments:
            if argument.startswith(b"triton_python_backend_shm_region_"):
                regions.append(Path("/dev/shm") / argument.decode())
    return regions


def _terminate_with_parent() -> None:
    """Ask Linux to send SIGTERM to the server if the launching process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def wait_until_ready(
    http_url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    log_hint: str = "the server log",
) -> None:
    """Poll ``/v2/health/ready`` until it returns 200 or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerUnavailableError(
                f"tritonserver exited with code {process.returncode} during start-up",
                f"read {log_hint} for the cause; a model that fails to load stops "
                "the server",
            )
        try:
            with urllib.request.urlopen(
                f"http://{http_url}/v2/health/ready", timeout=2
            ):
                return
        except urllib.error.HTTPError as error:
            last_error = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last_error = str(getattr(error, "reason", error))
        time.sleep(0.25)
    raise ServerUnavailableError(
        f"tritonserver at {http_url} not ready after {timeout_s:.0f} s ({last_error})",
        "raise --startup-timeout-s or read the server log",
    )


class LocalTritonServer:
    """One ``tritonserver`` child process, started and stopped as a context manager."""

    def __init__(self, config: ServerConfig, log_path: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    @property
    def grpc_url(self) -> str:
        return f"{self.config.address}:{self.config.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.config.address}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.address}:{self.config.metrics_port}/metrics"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def start(self) -> None:
        """Start the server and block until it reports ready."""
        repository = self.config.repository
        check_repository(repository)
        check_ports_free(self.config)

        external = self.config.external
        # An external server brings its own libraries, so the embedded server's
        # library path and Python backend stay out of its environment.
        if external is None:
            backend_dir = prepare_backend_dir()
            environment = server_environment()
        else:
            backend_dir = external.backend_dir
            environment = dict(os.environ)
        command = server_command(self.config, backend_dir)
        _LOGGER.info("starting tritonserver for repository %s", repository)
        _LOGGER.debug("command: %s", " ".join(_hide_admin_key(command)))

        output = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_path, "ab")  # noqa: SIM115
            output = self._log_handle
        self._process = subprocess.Popen(
            command,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )

        started = time.monotonic()
        try:
            log_hint = str(self.log_path) if self.log_path else "the server log above"
            wait_until_ready(
                self.http_url, self.config.startup_timeout_s, self._process, log_hint
            )
        except BaseException:
            self.stop()
            raise
        _LOGGER.info(
            "tritonserver ready in %.1f s: grpc %s, http %s, metrics %s",
            time.monotonic() - started,
            self.grpc_url,
            self.http_url,
            self.metrics_url,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the server with SIGTERM, then SIGKILL after ``timeout_s``.

        Whatever the server left behind in its process group (Python-backend
        stubs orphaned by a killed server) is killed too, and their shared
        memory regions are removed.
        """
        process = self._process
        if process is None:
            return None
        stubs = process_group_members(process.pid) if sys.platform == "linux" else []
        regions = _shared_memory_regions(stubs)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _LOGGER.warning(
                    "tritonserver did not stop in %.0f s; killing it", timeout_s
                )
                process.kill()
                process.wait()
        leftovers = (
            process_group_members(process.pid) if sys.platform == "linux" else []
        )
        if leftovers:
            _LOGGER.warning(
                "killing %d processes that tritonserver left behind", len(leftovers)
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _live_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for region in regions:
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        _LOGGER.info("tritonserver stopped with code %s", process.returncode)
        self._process = None
        return process.returncode

    def __enter__(self) -> LocalTritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
