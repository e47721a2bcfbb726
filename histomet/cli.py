"""``histomet``: build model repositories and run the local Triton server.

Commands:

* ``histomet export demo --repository DIR``: build the demo model version
  (seeded random weights) and write a Triton repository for the ``cpu`` target;
* ``histomet serve --repository DIR``: run the embedded ``tritonserver`` on
  127.0.0.1 until Ctrl-C or SIGTERM;
* ``histomet export encoder``, ``histomet embed``, ``histomet concepts encode``,
  ``histomet train`` and ``histomet export bundle``: build a trained version
  (see ``histomet.model_commands``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from histomet.arguments import OneLineErrorParser
from histomet.arguments import port_number
from histomet.arguments import positive_float
from histomet.errors import HistometError
from histomet.model_commands import MODEL_COMMANDS
from histomet.model_commands import add_export_kinds
from histomet.model_commands import add_model_commands
from histomet.model_commands import run_model_command

_LOGGER = logging.getLogger(__name__)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be 0 to 2**32-1, got {value}")
    return value


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
    demo.add_argument(
        "--repository", type=Path, required=True, help="repository folder to write"
    )
    demo.add_argument(
        "--encoder",
        choices=("full", "tiny"),
        default="full",
        help="full: CONCH-sized ViT-B/16 at 448 px; tiny: the same architecture "
        "scaled down, for tests (default: full)",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="weight seed, 0 to 2**32-1 (default: 0)"
    )
    demo.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the exported ONNX files (default: a temporary folder)",
    )

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

    model_spec = export_demo(
        args.repository, encoder=args.encoder, seed=args.seed, work_dir=args.work_dir
    )
    print(
        f"histomet: wrote repository {args.repository} (version {model_spec.version}, "
        f"manifest {model_spec.manifest_sha256[:12]}, demo weights: random)",
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
