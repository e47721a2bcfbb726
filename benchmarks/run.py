"""Run every cpu-target benchmark and write ``docs/benchmarks.md``.

One command regenerates the whole page. Each figure is compared with its baseline
measured in the same run, on the same tiles and the same threads, because absolute
times on a shared machine are noise:

* encoder: ONNX Runtime in-process tiles/s against torch eager, with the FLOP per
  tile against the measured float32 matmul rate of the cores;
* serving overhead: tiles/s through the Triton ensemble against ONNX Runtime
  in-process, for the default serving options and each tuning variant;
* overlap: slide stream time divided by max(tile reading, in-process inference),
  both halves timed apart on the same slide, with the first response, the
  remainder and Triton's queue time;
* constant memory: client and server peak RSS for a large synthetic slide against
  a small one, with the tiny encoder.

Usage::

    python benchmarks/run.py [--encoder full|tiny] [--repeats N] [--batch-size N]
                             [--large-px PX] [--skip variants memory]

``--encoder tiny`` swaps the tiny tower into the encoder, serving and overlap
sections, for a quick check of the script; the page's figures use ``full``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
SHARED_SLIDES = ROOT.parent / "shared" / "slides"
DEFAULT_SLIDE = SHARED_SLIDES / "CMU-1-Small-Region.svs"
# Further shared slides for the overlap goal, each with the MPP to give when the
# file has none. The TCGA fixture has no MPP metadata, so 0.5 µm/px is an assumed
# value: it sets only how many tiles the slide has.
OVERLAP_SLIDES = (
    ("dicom_cmu1_small", None),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.5),
)

from page import write_page  # noqa: E402


def read_tiles(slide_path: Path, model_spec) -> np.ndarray:
    """Read every tissue tile of a slide into memory, as the client would send them."""
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    with open_slide(slide_path) as slide:
        _, grid = plan_slide_tiles(
            slide,
            tile_px=model_spec.tile_px,
            target_mpp=model_spec.target_mpp,
            min_tissue_fraction=model_spec.min_tissue_fraction,
        )
        return np.concatenate([b.tiles for b in iter_tile_batches(slide, grid, 64)])


def onnx_session(model_path: Path, intra_op_threads: int = 0):
    """Open the encoder with the session options that the served model uses."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(
        str(model_path), options, providers=["CPUExecutionProvider"]
    )
    shape = session.get_inputs()[0].shape[1:]
    session.run(None, {"tiles": np.zeros((1, *shape), np.uint8)})  # warm-up
    return session


def time_onnxruntime(session, tiles: np.ndarray, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(tiles), batch_size):
        session.run(None, {"tiles": tiles[start : start + batch_size]})
    return time.perf_counter() - started


def time_torch(encoder, tiles: np.ndarray, batch_size: int) -> float:
    import torch

    with torch.no_grad():
        encoder(torch.from_numpy(tiles[:1]))  # warm-up
        started = time.perf_counter()
        for start in range(0, len(tiles), batch_size):
            encoder(torch.from_numpy(tiles[start : start + batch_size]))
    return time.perf_counter() - started


def predict_served(
    slide_path: Path,
    url: str,
    batch_size: int,
    shared_memory: bool = False,
    mpp: float | None = None,
) -> dict:
    from histomet.client.predict import PredictOptions
    from histomet.client.predict import predict_slide

    options = PredictOptions(
        url=url, batch_size=batch_size, shared_memory=shared_memory, mpp=mpp
    )
    return predict_slide(slide_path, options)


def start_server(repository: Path, log_path: Path):
    from histomet.serve.launcher import LocalTritonServer
    from histomet.serve.launcher import ServerConfig
    from histomet.serve.launcher import free_port

    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
    )
    return LocalTritonServer(config, log_path=log_path)


def measure_full_encoder(args, work: Path) -> dict:
    """Measure the encoder, serving overhead and overlap with default serving options."""
    import torch
    from measure import matmul_gflops
    from measure import queue_figures
    from measure import scrape_metrics
    from measure import time_halves
    from measure import vit_gflops_per_tile

    from histomet.client.predict import PredictOptions
    from histomet.export.demo import demo_encoder_config
    from histomet.export.demo import export_demo_graphs
    from histomet.export.repository import write_repository
    from histomet.models.encoder import build_demo_encoder

    graphs, model_spec = export_demo_graphs(work / "graphs-full", encoder=args.encoder)
    repository = work / "repository-full"
    write_repository(repository, graphs, model_spec)
    tiles = read_tiles(args.slide, model_spec)
    batch_size = min(args.batch_size, model_spec.encoder_max_batch)
    config = demo_encoder_config(args.encoder)
    encoder = build_demo_encoder(config, seed=0)
    torch.set_num_threads(os.cpu_count() or 1)
    session = onnx_session(graphs.encoder)

    onnx_s, torch_s, served, halves, queues, matmul = [], [], [], [], [], []
    shared = []
    with start_server(repository, work / "server-full.log") as server:
        predict_served(args.slide, server.grpc_url, batch_size)  # warm-up
        # Interleaved, so a change in machine load hits every variant alike.
        for _ in range(args.repeats):
            matmul.append(matmul_gflops())
            onnx_s.append(time_onnxruntime(session, tiles, batch_size))
            before = scrape_metrics(server.metrics_url)
            served.append(predict_served(args.slide, server.grpc_url, batch_size))
            queues.append(
                queue_figures(
                    before, scrape_metrics(server.metrics_url), "patch_encoder"
                )
            )
            halves.append(time_halves(args.slide, session, model_spec, batch_size))
            shared.append(
                predict_served(
                    args.slide, server.grpc_url, batch_size, shared_memory=True
                )
            )
            torch_s.append(time_torch(encoder, tiles, batch_size))
        other_slides = measure_other_slides(
            args, server, session, model_spec, batch_size
        )
    # When the last request leaves, up to this many requests remain in flight.
    max_in_flight = PredictOptions().max_in_flight
    return {
        "graphs": graphs,
        "model_spec": model_spec,
        "tiles": tiles,
        "batch_size": batch_size,
        "repeats": args.repeats,
        "slide_name": args.slide.name,
        "reader": served[0]["slide"]["reader"],
        "max_in_flight": max_in_flight,
        "encoder": args.encoder,
        "config": config,
        "gflop_per_tile": vit_gflops_per_tile(config),
        "matmul_gflops": statistics.median(matmul),
        "onnx_s": statistics.median(onnx_s),
        "torch_s": statistics.median(torch_s),
        "stream_s": statistics.median(r["timing_s"]["stream_s"] for r in served),
        "first_response_s": statistics.median(
            r["timing_s"]["first_response_s"] for r in served
        ),
        "last_request_s": statistics.median(
            r["timing_s"]["last_request_s"] for r in served
        ),
        "shared_stream_s": statistics.median(r["timing_s"]["stream_s"] for r in shared),
        "total_s": statistics.median(r["timing_s"]["total_s"] for r in served),
        "read_s": statistics.median(h["read_s"] for h in halves),
        "infer_s": statistics.median(h["infer_s"] for h in halves),
        "first_batch_read_s": statistics.median(
            h["first_batch_read_s"] for h in halves
        ),
        "first_batch_infer_s": statistics.median(
            h["first_batch_infer_s"] for h in halves
        ),
        "last_batch_infer_s": statistics.median(
            h["last_batch_infer_s"] for h in halves
        ),
        "tail_bound_s": statistics.median(
            sum(h["batch_infer_s"][-max_in_flight:]) for h in halves
        ),
        "queue_s": statistics.median(q["queue_s"] for q in queues),
        "compute_s": statistics.median(q["compute_s"] for q in queues),
        "requests": statistics.median(q["requests"] for q in queues),
        "executions": statistics.median(q["executions"] for q in queues),
        "other_slides": other_slides,
    }


def measure_other_slides(
    args, server, session, model_spec, batch_size: int
) -> list[dict]:
    """Measure the overlap of the further shared slides, like the first slide's."""
    from measure import time_halves

    rows = []
    for name, mpp in OVERLAP_SLIDES:
        path = args.slide.parent / name
        if not path.exists():
            rows.append({"slide": name, "missing": True})
            continue
        streams, halves = [], []
        for _ in range(min(args.repeats, 2)):
            result = predict_served(path, server.grpc_url, batch_size, mpp=mpp)
            streams.append(result)
            halves.append(time_halves(path, session, model_spec, batch_size, mpp))
        rows.append(
            {
                "slide": name,
                "mpp": mpp,
                "reader": streams[0]["slide"]["reader"],
                "tiles": streams[0]["slide"]["tiles"],
                "stream_s": statistics.median(
                    r["timing_s"]["stream_s"] for r in streams
                ),
                "read_s": statistics.median(h["read_s"] for h in halves),
                "infer_s": statistics.median(h["infer_s"] for h in halves),
            }
        )
    return rows


# Variants of the cpu target's serving options, against the default options.
def serving_variants() -> list[tuple[str, dict]]:
    return [
        (
            "preferred batch 4, no queue delay",
            {"encoder_preferred_batches": (4,), "encoder_queue_delay_us": 0},
        ),
        (
            "2 instances, 1 intra-op thread each",
            {"encoder_instances": 2, "encoder_intra_op_threads": 1},
        ),
        (
            "1 instance, intra-op threads = cores",
            {"encoder_intra_op_threads": os.cpu_count() or 1},
        ),
    ]


def measure_serving_variants(args, work: Path, full: dict) -> list[dict]:
    """Served / in-process tiles/s for each serving variant, each on a fresh server."""
    from histomet.export.repository import ServingOptions
    from histomet.export.repository import write_repository

    session = onnx_session(full["graphs"].encoder)
    rows = []
    for index, (name, changes) in enumerate(serving_variants()):
        options = dataclasses.replace(ServingOptions(), **changes)
        repository = work / f"repository-variant-{index}"
        write_repository(repository, full["graphs"], full["model_spec"], options)
        onnx_s, stream_s = [], []
        with start_server(repository, work / f"server-variant-{index}.log") as server:
            predict_served(args.slide, server.grpc_url, full["batch_size"])  # warm-up
            for _ in range(args.variant_repeats):
                onnx_s.append(
                    time_onnxruntime(session, full["tiles"], full["batch_size"])
                )
                result = predict_served(args.slide, server.grpc_url, full["batch_size"])
                stream_s.append(result["timing_s"]["stream_s"])
        rows.append(
            {
                "name": name,
                "options": changes,
                "onnx_s": statistics.median(onnx_s),
                "stream_s": statistics.median(stream_s),
            }
        )
    return rows


def measure_memory(args, work: Path) -> dict:
    """Peak RSS of client and server for a small and a large synthetic slide."""
    from memory import measure_slide
    from synthetic_slide import write_synthetic_slide

    from histomet.export.demo import export_demo_graphs
    from histomet.export.repository import write_repository

    graphs, model_spec = export_demo_graphs(work / "graphs-tiny", encoder="tiny")
    repository = work / "repository-tiny"
    write_repository(repository, graphs, model_spec)
    session = onnx_session(graphs.encoder)
    started = time.perf_counter()
    small = write_synthetic_slide(work / "synthetic-small.tif", args.small_px)
    large = write_synthetic_slide(work / "synthetic-large.tif", args.large_px)
    write_s = time.perf_counter() - started
    batch_size = model_spec.encoder_max_batch
    results = {}
    for label, path in (("small", small), ("large", large)):
        results[label] = measure_slide(
            path, repository, work, batch_size, session, model_spec, warm_up=small
        )
        results[label]["side_px"] = args.small_px if label == "small" else args.large_px
        results[label]["file_mib"] = path.stat().st_size / 2**20
    results["write_s"] = write_s
    results["batch_size"] = batch_size
    return results


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Reject what would fail only after minutes of measuring, before any of it."""
    from histomet.errors import HistometError
    from histomet.slide import open_slide

    if not args.slide.exists():
        parser.error(f"--slide {args.slide}: not found")
    try:
        with open_slide(args.slide):
            pass
    except HistometError as error:
        parser.error(f"--slide {args.slide}: {error}")
    if "memory" not in args.skip:
        minimum = 4096
        if args.small_px < minimum:
            parser.error(
                f"--small-px {args.small_px}: expected >= {minimum}, so that the small "
                "slide fills the client's pipeline"
            )
        if args.large_px <= args.small_px:
            parser.error(
                f"--large-px {args.large_px}: expected more than --small-px "
                f"{args.small_px}"
            )


def main() -> int:
    from histomet.arguments import positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoder",
        choices=("full", "tiny"),
        default="full",
        help="encoder for the encoder, serving and overlap sections; tiny is a quick "
        "check of the script (default: full)",
    )
    parser.add_argument(
        "--slide",
        type=Path,
        default=DEFAULT_SLIDE,
        help="slide for the encoder, serving and overlap sections; the further shared "
        f"slides are looked up next to it (default: {DEFAULT_SLIDE.name} in the "
        "shared slides folder)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="interleaved runs whose median each figure takes (default: 3)",
    )
    parser.add_argument(
        "--variant-repeats",
        type=positive_int,
        default=2,
        help="runs per serving variant (default: 2)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="tiles per request, capped by the encoder's max batch (default: 4)",
    )
    parser.add_argument(
        "--small-px",
        type=positive_int,
        default=16384,
        help="side of the small synthetic slide in pixels (default: 16384)",
    )
    parser.add_argument(
        "--large-px",
        type=positive_int,
        default=40000,
        help="side of the large synthetic slide in pixels (default: 40000)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("variants", "memory"),
        help="sections to leave out; the page says which were skipped",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="page to write (default: docs/benchmarks.md)",
    )
    args = parser.parse_args()
    check_arguments(parser, args)

    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="histomet-bench-") as temporary:
        work = Path(temporary)
        full = measure_full_encoder(args, work)
        variants = (
            None
            if "variants" in args.skip
            else measure_serving_variants(args, work, full)
        )
        memory = None if "memory" in args.skip else measure_memory(args, work)
    context = {
        "argv": sys.argv[1:],
        "args": args,
        "run_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": os.getloadavg(),
    }
    write_page(args.output, context, full, variants, memory)
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
