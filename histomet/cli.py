"""``histomet``: build model repositories and run the local Triton server.

Commands:

* ``histomet export demo --repository DIR [--target cpu|gpu]``: build the demo
  model version (seeded random weights) and write a Triton repository for the
  embedded ``cpu`` server or the NGC container's ``gpu`` backends;
* ``histomet serve --repository DIR``: run the embedded ``tritonserver`` on
  127.0.0.1 until Ctrl-C or SIGTERM;
* ``histomet export encoder``, ``histomet embed``, ``histomet concepts encode``,
  ``histomet train`` and ``histomet export bundle``: build a trained version
  (see ``histomet.model_commands``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from histomet import spec
from histomet.arguments import OneLineErrorParser
from histomet.arguments import seed
from histomet.arguments import port_number
from histomet.arguments import positive_float
from histomet.errors import HistometError
from histomet.errors import UsageError
from histomet.model_commands import MODEL_COMMANDS
from histomet.model_commands import add_export_kinds
from histomet.model_commands import add_model_commands
from histomet.model_commands import run_model_command

_LOGGER = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="histomet", description="Build HistoMet model repositories and serve them."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show stack traces and debug logs"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=OneLineErrorParser
    )

    export = commands.add_parser("export", help="export models to a Triton repository")
    export_kinds = export.add_subparsers(
        dest="kind", required=True, parser_class=OneLineErrorParser
    )
    demo = export_kinds.add_parser(
        "demo", help="the demo version: seeded random weights, cpu target"
    )
    demo.add_argument("--repository", type=Path, help="repository folder to write")
    demo.add_argument(
        "--encoder",
        choices=("full", "tiny"),
        default="full",
        help="full: CONCH-sized ViT-B/16 at 448 px; tiny: the same architecture "
        "scaled down, for tests (default: full)",
    )
    demo.add_argument(
        "--seed", type=seed, default=0, help="weight seed, 0 to 2**32-1 (default: 0)"
    )
    demo.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the embedded server's Python backend; gpu: the NGC tritonserver "
        "container, KIND_GPU instances and TensorRT (default: cpu)",
    )
    demo.add_argument(
        "--encoder-backend",
        choices=spec.GPU_ENCODER_BACKENDS,
        default=spec.GPU_ENCODER_BACKENDS[0],
        help="gpu target only: how the encoder runs (default: %(default)s)",
    )
    demo.add_argument(
        "--bundle",
        type=Path,
        help="write a version bundle for the registry to this new folder instead "
        "of a repository",
    )
    demo.add_argument(
        "--parity-slide",
        type=Path,
        help="with --bundle: also check torch against ONNX Runtime on up to 16 "
        "tissue tiles of this slide, and keep the report in the bundle",
    )
    demo.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the exported ONNX files (default: a temporary folder)",
    )

    _add_registry_parser(commands)
    add_export_kinds(export_kinds)
    add_model_commands(commands)

    serve = commands.add_parser("serve", help="run tritonserver on 127.0.0.1")
    serve.add_argument(
        "--repository", type=Path, required=True, help="model repository"
    )
    serve.add_argument(
        "--grpc-port", type=port_number, default=8001, help="gRPC port (default: 8001)"
    )
    serve.add_argument(
        "--http-port", type=port_number, default=8000, help="HTTP port (default: 8000)"
    )
    serve.add_argument(
        "--metrics-port",
        type=port_number,
        default=8002,
        help="Prometheus metrics port (default: 8002)",
    )
    serve.add_argument(
        "--startup-timeout-s",
        type=positive_float,
        default=180.0,
        help="seconds to wait for the server to become ready (default: 180)",
    )
    serve.add_argument(
        "--log-file", type=Path, help="append the server's log to this file"
    )
    return parser


def _add_registry_parser(commands) -> None:
    registry = commands.add_parser(
        "registry", help="model versions in an MLflow registry (registry extra)"
    )
    registry.add_argument(
        "--registry-uri",
        default=os.environ.get("HISTOMET_REGISTRY_URI"),
        help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: "
        "$HISTOMET_REGISTRY_URI, else a SQLite registry in ./registry)",
    )
    actions = registry.add_subparsers(
        dest="action", required=True, parser_class=OneLineErrorParser
    )
    register = actions.add_parser("register", help="create a version from a bundle")
    register.add_argument("name", help="registered model name")
    register.add_argument("bundle", type=Path, help="version bundle folder")
    register.add_argument("--description", default="", help="version description")
    listing = actions.add_parser("list", help="list a model's versions")
    listing.add_argument("name")
    show = actions.add_parser("show", help="show a version and the alias history")
    show.add_argument("name")
    show.add_argument("reference", help="version number or alias")
    verify = actions.add_parser(
        "verify", help="re-hash a version's artifacts and replay its golden pair"
    )
    verify.add_argument("name")
    verify.add_argument("reference", help="version number or alias")
    for action, text in (
        ("promote", "verify a version and point an alias at it"),
        ("rollback", "point an alias back at its previous version"),
    ):
        command = actions.add_parser(action, help=text)
        command.add_argument("name")
        if action == "promote":
            command.add_argument("version", type=int, help="version number")
        command.add_argument(
            "--alias", default="production", help="production or staging"
        )
        command.add_argument("--reason", required=True, help="why, for the audit log")
        command.add_argument("--actor", help="who (default: the login name)")
        command.add_argument(
            "--server",
            help="gRPC address HOST:PORT of a running server to switch first; "
            "needs --root",
        )
        command.add_argument(
            "--root", type=Path, help="publish folder the server serves (ROOT/current)"
        )
    publish = actions.add_parser(
        "publish", help="write an alias's version as the served repository view"
    )
    publish.add_argument("name")
    publish.add_argument(
        "reference",
        nargs="?",
        default="production",
        help="alias or version number (default: production)",
    )
    publish.add_argument(
        "--root",
        type=Path,
        required=True,
        help="publish folder; serve ROOT/current",
    )
    publish.add_argument("--target", choices=("cpu", "gpu"), default="cpu")


def _registry(args: argparse.Namespace) -> int:
    try:
        from histomet.registry.publish import publish
        from histomet.registry.store import open_registry
    except ImportError as error:
        print(
            f"histomet: error: the registry needs MLflow ({error.name} is missing). "
            "Install it with: pip install 'histomet[registry]'",
            file=sys.stderr,
        )
        return 2
    registry = open_registry(args.registry_uri)
    if args.action == "register":
        info = registry.register(args.name, args.bundle, description=args.description)
        print(
            f"histomet: registered {info.name} version {info.version} "
            f"(bundle {info.bundle_sha256[:12]}, manifest {info.manifest_sha256[:12]})"
        )
    elif args.action == "list":
        for info in registry.versions(args.name):
            aliases = ",".join(info.aliases) or "-"
            demo = "  demo weights" if info.demo_weights else ""
            print(
                f"{info.name}  v{info.version}  {aliases}  {info.spec_version}  "
                f"bundle {info.bundle_sha256[:12]}{demo}"
            )
    elif args.action == "show":
        info = registry.resolve(args.name, args.reference)
        print(
            f"{info.name} v{info.version}: spec {info.spec_version}, aliases "
            f"{','.join(info.aliases) or '-'}, bundle {info.bundle_sha256}, "
            f"manifest {info.manifest_sha256}, run {info.run_id}, training run "
            f"{info.training_run_id or '-'}"
        )
        for event in registry.history(args.name):
            when = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time_ms / 1000)
            )
            source = "-" if event.from_version is None else f"v{event.from_version}"
            print(
                f"  {when}  {event.action:8s} {event.alias}: {source} -> "
                f"v{event.to_version}  by {event.actor}: {event.reason}"
            )
    elif args.action == "verify":
        bundle = registry.verify(args.name, args.reference)
        print(
            f"histomet: {args.name} {args.reference}: {len(bundle.files)} files match "
            "their SHA-256 and the golden outputs reproduce"
        )
    elif args.action in ("promote", "rollback"):
        if (args.server is None) != (args.root is None):
            raise UsageError(
                "--server and --root go together",
                "pass both to switch a running server, or neither to move the alias only",
            )
        if args.server is not None:
            from histomet.registry.live import rollback_server
            from histomet.registry.live import switch_server

            if args.action == "promote":
                event = switch_server(
                    registry,
                    args.name,
                    args.version,
                    args.root,
                    args.server,
                    alias=args.alias,
                    reason=args.reason,
                    actor=args.actor,
                )
            else:
                event = rollback_server(
                    registry,
                    args.name,
                    args.root,
                    args.server,
                    alias=args.alias,
                    reason=args.reason,
                    actor=args.actor,
                )
        elif args.action == "promote":
            event = registry.promote(
                args.name,
                args.version,
                alias=args.alias,
                reason=args.reason,
                actor=args.actor,
            )
        else:
            event = registry.rollback(
                args.name, alias=args.alias, reason=args.reason, actor=args.actor
            )
        source = "none" if event.from_version is None else f"v{event.from_version}"
        print(
            f"histomet: {event.action}: {event.name} alias {event.alias} moved from "
            f"{source} to v{event.to_version}"
        )
    elif args.action == "publish":
        view = publish(
            registry, args.name, args.reference, args.root, target=args.target
        )
        print(
            f"histomet: published {view.name} v{view.version} ({view.target}) as "
            f"{args.root / 'current'}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from histomet.serve.launcher import LocalTritonServer
    from histomet.serve.launcher import ServerConfig

    config = ServerConfig(
        repository=args.repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        startup_timeout_s=args.startup_timeout_s,
    )
    server = LocalTritonServer(config, log_path=args.log_file)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        _LOGGER.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    print(
        f"histomet: tritonserver ready: grpc {server.grpc_url}, http {server.http_url}, "
        f"metrics {server.metrics_url}. Stop with Ctrl-C.",
        flush=True,
    )
    process = server.process
    while not stop.is_set():
        if process is not None and process.poll() is not None:
            print(
                f"histomet: error: tritonserver exited with code {process.returncode}. "
                "Read its log for the cause",
                file=sys.stderr,
            )
            return 4
        stop.wait(0.5)
    code = server.stop()
    if code != 0:
        print(
            f"histomet: error: tritonserver stopped with exit code {code}. "
            "Read its log for the cause",
            file=sys.stderr,
        )
        return 4
    print("histomet: tritonserver stopped", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from histomet.export.demo import export_demo

    if (args.repository is None) == (args.bundle is None):
        raise UsageError(
            "export demo needs exactly one of --repository and --bundle",
            "pass --repository DIR to serve it, or --bundle DIR to register it",
        )
    if args.bundle is not None:
        return _export_bundle(args)

    gpu_options = None
    if args.target == "gpu":
        from histomet.export.gpu import GpuServingOptions

        gpu_options = GpuServingOptions(encoder_backend=args.encoder_backend)
    model_spec = export_demo(
        args.repository,
        encoder=args.encoder,
        seed=args.seed,
        work_dir=args.work_dir,
        gpu_options=gpu_options,
    )
    print(
        f"histomet: wrote {args.target} repository {args.repository} "
        f"(version {model_spec.version}, "
        f"manifest {model_spec.manifest_sha256[:12]}, demo weights: random)",
        flush=True,
    )
    return 0


def _export_bundle(args: argparse.Namespace) -> int:
    import tempfile

    import json

    from histomet.export.demo import export_demo_graphs_with_report
    from histomet.registry.version_bundle import write_bundle

    if args.bundle.exists():
        raise UsageError(
            f"bundle folder {args.bundle} already exists",
            "bundles are immutable; give a new folder",
        )

    with tempfile.TemporaryDirectory(prefix="histomet-export-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        graphs, model_spec, report = export_demo_graphs_with_report(
            work_dir,
            encoder=args.encoder,
            seed=args.seed,
            parity_slide=args.parity_slide,
        )
        report_path = Path(temporary) / "parity.json"
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        bundle = write_bundle(
            args.bundle, graphs, model_spec, extra_files={"parity.json": report_path}
        )
    print(
        f"histomet: wrote version bundle {args.bundle} (version {model_spec.version}, "
        f"bundle {bundle.digest[:12]}, demo weights: random)",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "export" and args.kind == "demo":
            return _export(args)
        if args.command == "registry":
            return _registry(args)
        if args.command in MODEL_COMMANDS or args.command == "export":
            return run_model_command(args)
    except HistometError as error:
        if args.debug:
            _LOGGER.exception("command failed")
        print(f"histomet: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if args.debug:
            _LOGGER.exception("command failed")
        where = f" {error.filename}" if error.filename else ""
        print(
            f"histomet: error: cannot access{where}: {error.strerror or error}. "
            "Check the path and its permissions",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("histomet: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
