"""``histomet-client``: predict metastasis risk and site for a slide through Triton.

``histomet-client tiles`` checks that a slide opens and tiles, without a server.

Exit codes for one slide: 0 prediction made, 1 unexpected error, 2 invalid
arguments, 3 invalid input slide, 4 server or model failure, 5 no tissue found,
130 interrupted, 143 terminated.

Several slides, a folder of slides, ``--manifest``, ``--results`` or ``--shard``
make a batch run (see ``histomet.client.batch``). Its exit code is 0 when every
slide has a result (a prediction or no tissue), else 4 if any slide failed on
the server, 3 if any failed as invalid input, 1 otherwise; 130 and 143 when
interrupted, with every finished result kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

from histomet.arguments import OneLineErrorParser
from histomet.arguments import port_number
from histomet.arguments import positive_float
from histomet.arguments import positive_int
from histomet.client.native_output import NativeOutputMonitor
from histomet.client.native_output import RedactingFilter
from histomet.client.native_output import redact
from histomet.errors import HistometError
from histomet.errors import NoTissueError
from histomet.errors import UsageError
from histomet.slide.mpp import MAX_PLAUSIBLE_MPP
from histomet.slide.mpp import MIN_PLAUSIBLE_MPP

_LOGGER = logging.getLogger(__name__)


def _mpp(text: str) -> float:
    value = positive_float(text)
    if not MIN_PLAUSIBLE_MPP <= value <= MAX_PLAUSIBLE_MPP:
        raise argparse.ArgumentTypeError(
            f"{text} µm/px is outside the plausible range {MIN_PLAUSIBLE_MPP} to "
            f"{MAX_PLAUSIBLE_MPP} (about 0.25 at 40x, 0.5 at 20x)"
        )
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _non_empty_path(text: str) -> Path:
    return Path(_non_empty(text))


def _grpc_url(text: str) -> str:
    """Check a Triton gRPC address of the form HOST:PORT."""
    hint = "give Triton's gRPC address as HOST:PORT, for example 127.0.0.1:8001"
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r} has a scheme; {hint}")
    host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise argparse.ArgumentTypeError(f"{text!r} lacks a host or a port; {hint}")
    try:
        port_number(port)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}; {hint}") from None
    return text


def _pushgateway_url(text: str) -> str:
    """Check a Pushgateway address of the form http(s)://HOST:PORT[/PATH]."""
    hint = "give the Pushgateway's URL, for example http://127.0.0.1:9091"
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r} lacks http:// or https://; {hint}")
    host = rest.split("/", 1)[0]
    if not host or host.startswith(":"):
        raise argparse.ArgumentTypeError(f"{text!r} lacks a host; {hint}")
    return text


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of 0 or more, got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="histomet-client",
        description="Predict metastasis risk, and site for high-risk slides, "
        "from a whole-slide image through a Triton server.",
    )
    debug = OneLineErrorParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show stack traces and debug logs",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show stack traces and debug logs"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=OneLineErrorParser
    )

    predict = commands.add_parser(
        "predict",
        help="predict one slide, or many into a results file",
        parents=[debug],
    )
    predict.add_argument(
        "slides",
        metavar="SLIDE",
        nargs="*",
        type=_non_empty_path,
        help="slide file, DICOM WSI folder, or folder to scan for slides",
    )
    predict.add_argument(
        "--url",
        type=_grpc_url,
        default="127.0.0.1:8001",
        help="Triton gRPC address HOST:PORT (default: 127.0.0.1:8001)",
    )
    predict.add_argument(
        "--model",
        type=_non_empty,
        default="histomet",
        help="ensemble name (default: histomet)",
    )
    predict.add_argument(
        "--json",
        type=_non_empty_path,
        help="write the result as JSON to this file; - for standard output",
    )
    predict.add_argument(
        "--mpp",
        type=_mpp,
        help="microns per pixel at level 0, for slides whose metadata lacks it; "
        "overrides the metadata when given",
    )
    predict.add_argument(
        "--reader",
        choices=("auto", "cucim", "openslide"),
        default="auto",
        help="slide reader (default: auto, cuCIM then OpenSlide)",
    )
    predict.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="tiles per request, capped by the encoder's max_batch_size (default: 16)",
    )
    predict.add_argument(
        "--shared-memory",
        action="store_true",
        help="send tiles through system shared memory instead of the gRPC stream; "
        "only for a server on this host (in Kubernetes, a container of this pod "
        "that shares /dev/shm)",
    )
    predict.add_argument(
        "--timeout-s",
        type=positive_float,
        default=600.0,
        help="seconds to wait for each response before failing the slide (default: 600)",
    )
    predict.add_argument(
        "--metrics-port",
        type=port_number,
        help="serve the client's Prometheus metrics on 127.0.0.1:PORT while running",
    )
    predict.add_argument(
        "--metrics-linger-s",
        type=_non_negative_float,
        default=0.0,
        help="keep the metrics endpoint up this many seconds after the prediction, "
        "so a scraper can read the final values (default: 0)",
    )
    _add_batch_arguments(predict)
    _add_retry_and_tls_arguments(predict)
    predict.add_argument(
        "--show-paths",
        action="store_true",
        help="name the slide's path in messages (off by default: file names can "
        "hold patient identifiers)",
    )
    predict.add_argument(
        "--quiet", action="store_true", help="print nothing but errors"
    )
    predict.add_argument(
        "--pushgateway",
        type=_pushgateway_url,
        metavar="URL",
        help="push the client's metrics to this Prometheus Pushgateway when the run "
        "ends, after success or failure (for batch jobs that end before a scrape)",
    )
    predict.add_argument(
        "--heatmap",
        type=_non_empty_path,
        help="one slide only: write the risk attention over the slide thumbnail to "
        "this PNG file",
    )
    predict.add_argument(
        "--geojson",
        type=_non_empty_path,
        help="one slide only: write every tile as a GeoJSON polygon in level-0 "
        "pixels, with its attention and top concepts as properties",
    )
    predict.add_argument(
        "--per-tile",
        action="store_true",
        help="one slide only: add every tile's attention and top concepts to the "
        "JSON result (key 'tiles')",
    )

    from histomet.client.tiles import add_tiles_arguments

    tiles = commands.add_parser(
        "tiles",
        help="open, mask and tile a slide without a server, and report the result",
        parents=[debug],
    )
    add_tiles_arguments(tiles, _mpp)
    return parser


def _shard(text: str) -> tuple[int, int]:
    hint = "give INDEX/COUNT with 0 <= INDEX < COUNT, for example 0/4"
    index, separator, count = text.partition("/")
    if not separator or not index.isdigit() or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT; {hint}")
    if not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; {hint}")
    return int(index), int(count)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"must be a whole number of 0 or more: {text!r}"
        )
    return int(text)


def _add_batch_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument(
        "--manifest",
        type=_non_empty_path,
        metavar="CSV",
        help="CSV file with a 'path' column of slides, relative to the CSV's folder",
    )
    predict.add_argument(
        "--results",
        type=_non_empty_path,
        metavar="OUT.jsonl",
        help="append one JSON line per slide to this file; a rerun skips the "
        "slides that it already holds as finished (default: standard output)",
    )
    predict.add_argument(
        "--shard",
        type=_shard,
        metavar="INDEX/COUNT",
        help="predict only the slides whose input row number modulo COUNT is INDEX",
    )
    predict.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="batch progress on stderr (default: auto, a bar on a terminal, else "
        "one line per slide)",
    )
    predict.add_argument(
        "--in-process",
        action="store_true",
        help="predict batch slides in this process instead of a worker process; "
        "a native crash in a slide reader then ends the whole run",
    )
    predict.add_argument(
        "--max-server-failures",
        type=_non_negative_int,
        default=3,
        help="stop a batch run after this many slides in a row could not reach "
        "the server; 0 never stops (default: 3)",
    )


def _add_retry_and_tls_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument(
        "--retries",
        type=_non_negative_int,
        default=3,
        help="times to send a slide again as a new sequence after the server went "
        "away, restarted, was busy or changed model version (default: 3)",
    )
    predict.add_argument(
        "--retry-backoff-s",
        type=_non_negative_float,
        default=1.0,
        help="seconds before the first retry, doubling for each next one, plus up "
        "to 50%% jitter (default: 1)",
    )
    predict.add_argument(
        "--tls-ca",
        type=_non_empty_path,
        help="connect over TLS, trusting the server certificate signed by this "
        "CA (PEM file)",
    )
    predict.add_argument(
        "--tls-cert",
        type=_non_empty_path,
        help="client certificate (PEM) for a server that requires mutual TLS",
    )
    predict.add_argument(
        "--tls-key", type=_non_empty_path, help="private key (PEM) of --tls-cert"
    )


# Paths that name an open descriptor of this process. They are written in place,
# never resolved or renamed over, so a pipe or an appended log file keeps working.
_DESCRIPTOR_PATHS = {"-": 1, "/dev/stdout": 1, "/dev/stderr": 2}


def _descriptor(path: Path) -> int | None:
    text = str(path)
    if text in _DESCRIPTOR_PATHS:
        return _DESCRIPTOR_PATHS[text]
    for prefix in ("/dev/fd/", "/proc/self/fd/"):
        if text.startswith(prefix) and text[len(prefix) :].isdigit():
            return int(text[len(prefix) :])
    return None


def check_output_path(path: Path, slide: Path) -> Path:
    """Return where ``--json`` will write, or raise ``UsageError`` before any work.

    ``-``, ``/dev/stdout``, ``/dev/stderr`` and ``/dev/fd/N`` are written to
    that descriptor. Another symbolic link is followed, so the file it points to
    is replaced and the link kept. A character device or FIFO is written in
    place. The target must not be a folder or the slide itself, and its folder
    must exist and be writable.
    """
    if _descriptor(path) is not None:
        return path
    target = path.resolve() if path.is_symlink() else path
    if target.exists():
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(
                f"--json {path} is a folder", "give a file path for the result"
            )
        if slide.exists() and target.samefile(slide):
            raise UsageError(
                "--json points at the input slide",
                "give another file path for the result",
            )
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise UsageError(
                f"--json {path} is not a regular file",
                "give a file path for the result",
            )
    if not target.parent.is_dir():
        raise UsageError(
            f"--json folder {target.parent} does not exist", "create it first"
        )
    if not target.exists() or target.is_file():
        # Create and remove a file where the result will go, so a read-only or
        # full folder fails now rather than after the prediction.
        try:
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".histomet-"):
                pass
        except OSError as error:
            raise UsageError(
                f"cannot write to the --json folder {target.parent} ({error.strerror})",
                "give a writable path",
            ) from error
    return target


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` as JSON; a regular file goes through a temporary file and a rename.

    The rename means that no reader ever sees half a file, and an interrupted
    write leaves the previous file in place. Descriptors, devices and FIFOs are
    written in place.
    """
    text = json.dumps(result, indent=2) + "\n"
    descriptor = _descriptor(path)
    if descriptor is not None:
        sys.stdout.flush()
        data = text.encode()
        while data:
            data = data[os.write(descriptor, data) :]
        return
    if path.exists() and not path.is_file():
        with open(path, "w") as stream:
            stream.write(text)
        return
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        temporary = Path(handle.name)
    try:
        temporary.write_text(text)
        # NamedTemporaryFile creates the file 0600; give it the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def format_summary(result: dict) -> str:
    """Return the short human summary of a result; never includes the file name."""
    slide = result["slide"]
    model = result["model"]
    lines = []
    if model.get("demo_weights"):
        lines.append(f"*** {result['notice']} ***")
    lines.append(
        f"slide   {slide['id']}  reader {slide['reader']}  {slide['mpp']:.3f} µm/px "
        f"({slide['mpp_source']})  {slide['tiles']} tiles of {slide['tile_px']} px"
    )

    if result["status"] == "no_tissue":
        lines.append(f"result  {result['message']}")
        return "\n".join(lines)

    risk = result["risk"]
    decision = "HIGH RISK" if risk["high_risk"] else "low risk"
    lines.append(
        f"risk    {risk['probability']:.4f}  threshold {risk['threshold']:.4f} "
        f"(operating point for {risk['sensitivity_target']:.0%} sensitivity): {decision}"
    )

    site = result["site"]
    if site["evaluated"]:
        ranked = sorted(site["probabilities"].items(), key=lambda item: -item[1])
        lines.append("site    " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))
    else:
        lines.append(f"site    not evaluated: {site['reason']}")
    lines.append(
        f"model   {model['name']} {model['version']} (Triton version {model['triton_version']}, "
        f"manifest {model['manifest_sha256'][:12]})"
    )

    timing = result["timing_s"]
    lines.append(
        f"time    {timing['total_s']:.1f} s total: tissue {timing['tissue_s']:.1f} s, "
        f"tile reads {timing['tiling_read_s']:.1f} s, stream {timing['stream_s']:.1f} s "
        "(reads overlap inference)"
    )
    if model.get("demo_weights"):
        lines.append(f"*** {result['notice']} ***")
    return "\n".join(lines)


def check_map_path(path: Path, option: str, slide: Path) -> Path:
    """Return ``path`` for an interpretation output, or raise ``UsageError`` before any work."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder", "give a file path")
    if not path.parent.is_dir():
        raise UsageError(
            f"{option} folder {path.parent} does not exist", "create it first"
        )
    if path.exists() and slide.exists() and path.samefile(slide):
        raise UsageError(
            f"{option} points at the input slide", "give another file path"
        )
    return path


def _write_maps(args: argparse.Namespace, maps, result: dict) -> None:
    from histomet.client.interpret import tile_records
    from histomet.client.interpret import write_geojson
    from histomet.client.interpret import write_heatmap

    if result["status"] != "ok":
        return
    if args.per_tile:
        result["tiles"] = tile_records(maps)
    for option, path, write in (
        ("--heatmap", args.heatmap, write_heatmap),
        ("--geojson", args.geojson, write_geojson),
    ):
        if path is None:
            continue
        try:
            write(path, maps)
        except OSError as error:
            raise HistometError(
                f"cannot write {option} {path} ({error.strerror})",
                "free space or give another path, then run again",
            ) from error


def _predict_options(args: argparse.Namespace):
    from histomet.client.predict import PredictOptions
    from histomet.client.served_model import TlsSettings

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError(
            "--tls-cert and --tls-key must be given together",
            "give both for mutual TLS, or neither",
        )
    if args.tls_cert is not None and args.tls_ca is None:
        raise UsageError("--tls-cert needs --tls-ca", "give the server's CA as well")
    tls = None
    if args.tls_ca is not None:
        tls = TlsSettings(args.tls_ca, args.tls_cert, args.tls_key)
    return PredictOptions(
        url=args.url,
        model=args.model,
        reader=args.reader,
        mpp=args.mpp,
        batch_size=args.batch_size,
        timeout_s=args.timeout_s,
        retries=args.retries,
        retry_backoff_s=args.retry_backoff_s,
        tls=tls,
        show_paths=args.show_paths,
        shared_memory=args.shared_memory,
    )


def _select_mode(args: argparse.Namespace) -> None:
    """Set ``args.batch``, and ``args.slide`` to the one slide of a single prediction."""
    from histomet.client.batch import is_batch_folder

    slides = args.slides
    args.batch = bool(
        args.manifest is not None
        or args.results is not None
        or args.shard is not None
        or len(slides) != 1
        or is_batch_folder(slides[0])
    )
    args.slide = None if args.batch else slides[0]
    if not slides and args.manifest is None:
        raise UsageError(
            "no slide given", "give slide files, a folder of slides or --manifest CSV"
        )
    if args.batch and args.json is not None:
        raise UsageError(
            "--json writes the result of one slide",
            "use --results OUT.jsonl for several slides",
        )
    for option, value in (
        ("--heatmap", args.heatmap),
        ("--geojson", args.geojson),
        ("--per-tile", args.per_tile or None),
    ):
        if args.batch and value is not None:
            raise UsageError(
                f"{option} writes the maps of one slide",
                "predict that slide on its own to get its maps",
            )


def _predict(args: argparse.Namespace) -> int:
    from histomet.client import metrics
    from histomet.client.interpret import TileMaps
    from histomet.client.predict import predict_slide

    options = _predict_options(args)
    output = None
    if not args.batch and args.json is not None:
        output = check_output_path(args.json, args.slide)
    if not args.batch:
        for option, path in (("--heatmap", args.heatmap), ("--geojson", args.geojson)):
            if path is not None:
                check_map_path(path, option, args.slide)
    maps = TileMaps(want_thumbnail=args.heatmap is not None)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(args.metrics_port, addr="127.0.0.1")
        except OSError as error:
            raise UsageError(
                f"cannot serve metrics on 127.0.0.1:{args.metrics_port} ({error.strerror})",
                "pass a free --metrics-port",
            ) from error
        _LOGGER.info("client metrics on http://127.0.0.1:%d/metrics", args.metrics_port)
    try:
        if args.batch:
            return _predict_batch(args, options)
        with NativeOutputMonitor(_secrets(args)):
            result = predict_slide(args.slide, options, maps)
        metrics.record_model(result["model"])
        _write_maps(args, maps, result)
        if output is not None:
            try:
                write_json(output, result)
            except OSError as error:
                raise HistometError(
                    f"cannot write the result to --json {args.json} ({error.strerror})",
                    "free space or give another path, then run again",
                ) from error
        if not args.quiet:
            # With the JSON on standard output, the summary goes to stderr.
            to_stdout = output is None or _descriptor(output) != 1
            print(format_summary(result), file=sys.stdout if to_stdout else sys.stderr)
            sys.stdout.flush()
    finally:
        # The metrics stay readable after success and after failure alike.
        if args.pushgateway is not None:
            metrics.push_metrics(args.pushgateway)
        if args.metrics_port is not None and args.metrics_linger_s > 0:
            time.sleep(args.metrics_linger_s)
    if result["status"] == "no_tissue":
        return NoTissueError.exit_code
    return 0


def _predict_batch(args: argparse.Namespace, options) -> int:
    from histomet.client.batch import BatchOptions
    from histomet.client.batch import expand_inputs
    from histomet.client.batch import run_batch

    inputs = expand_inputs(args.slides, args.manifest)
    if not inputs:
        raise UsageError(
            "no slides found in the folders and manifest given",
            "slide files end in .svs, .tif, .tiff, .ndpi, .mrxs, .scn and similar; "
            "a DICOM WSI folder contains .dcm files",
        )
    if args.results is not None and _descriptor(args.results) is None:
        if args.results.is_dir():
            raise UsageError(
                f"--results {args.results} is a folder", "give a file path"
            )
        if not args.results.parent.is_dir():
            raise UsageError(
                f"--results folder {args.results.parent} does not exist",
                "create it first",
            )
        if args.results.exists():
            # Appending to an input would damage a slide or the manifest.
            inputs_given = [item.path for item in inputs]
            if args.manifest is not None:
                inputs_given.append(args.manifest)
            for given in inputs_given:
                if given.is_file() and args.results.samefile(given):
                    raise UsageError(
                        "--results points at an input slide or the manifest",
                        "give a new file path for the results",
                    )
    results = None if args.results is None or str(args.results) == "-" else args.results
    batch_options = BatchOptions(
        results=results,
        shard=args.shard or (0, 1),
        progress="none" if args.quiet else args.progress,
        max_consecutive_server_failures=args.max_server_failures,
        isolate=not args.in_process,
    )
    with NativeOutputMonitor(()) as monitor:
        log_filters = []
        for handler in logging.getLogger().handlers:
            for log_filter in handler.filters:
                if isinstance(log_filter, RedactingFilter):
                    log_filters.append(log_filter)

        def hide_names(path: Path) -> tuple[str, ...]:
            """Point the log and output filters at the names of the next slide."""
            secrets = () if args.show_paths else _path_secrets(path)
            monitor.secrets = secrets
            for log_filter in log_filters:
                log_filter.secrets = secrets
            return secrets

        summary = run_batch(inputs, options, batch_options, hide_names)
    return summary.exit_code()


def _secrets(args: argparse.Namespace) -> tuple[str, ...]:
    """Return the strings that name the slide, which messages must not show."""
    if getattr(args, "show_paths", False) or getattr(args, "slide", None) is None:
        return ()
    return _path_secrets(args.slide)


def _path_secrets(slide: Path) -> tuple[str, ...]:
    """Return the strings that name ``slide``: its path forms and its name.

    A path with a newline is also split into its lines, because native readers
    print it across lines. Fragments under 3 characters are skipped, so that
    redaction never replaces ordinary text such as ".".
    """
    names = {str(slide), str(slide.absolute()), str(slide.resolve()), slide.name}
    fragments = {line for name in names for line in name.splitlines()}
    # Libraries print a name that is not valid UTF-8 in its escaped repr form.
    escaped = {repr(name)[1:-1] for name in names}
    return tuple(sorted(s for s in names | fragments | escaped if len(s) >= 3))


class _Terminated(BaseException):
    """SIGTERM arrived; raised so that clean-up (the abort of a sequence) runs."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            _select_mode(args)
    except UsageError as error:
        print(f"histomet-client: error: {error}", file=sys.stderr)
        return error.exit_code
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )

    if not args.debug:
        # tifffile warns about odd files the readers then reject with a clear error.
        logging.getLogger("tifffile").setLevel(logging.ERROR)

    signal.signal(signal.SIGTERM, _raise_terminated)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C and kill -INT
    # must still stop a prediction cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    redacting = RedactingFilter(_secrets(args))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)

    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "tiles":
            from histomet.client.tiles import run_tiles

            return run_tiles(args)
        parser.error(f"unknown command {args.command}")
    except HistometError as error:
        if args.debug:
            _LOGGER.exception("prediction failed")
        message = " ".join(redact(str(error), _secrets(args)).split())
        print(f"histomet-client: error: {message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("histomet-client: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("histomet-client: terminated", file=sys.stderr)
        return 143
    except Exception as error:  # noqa: BLE001 - last resort, one line unless --debug
        if args.debug:
            raise
        message = " ".join(redact(str(error), _secrets(args)).split())
        print(
            f"histomet-client: error: unexpected {type(error).__name__}: {message}. "
            "Rerun with --debug for the stack trace",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
