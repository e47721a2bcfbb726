"""Fuzz the slide reader and tiler with mutated and truncated copies of real slides.

Hypothesis draws each case: a source slide and one to four mutations. A
mutation is a truncation, a flipped byte, a zeroed range, or an interesting
integer written into a TIFF structure (an IFD entry, a tag value, the first-IFD
offset). The structure offsets are read from the pristine file with tifffile. Each case runs
``open_slide``, ``plan_slide_tiles`` and ``iter_tile_batches`` (the public slide
API) in a child forked from this process after the imports, so a native crash
or a hang takes down the child only. The outcome of each case is one of:

* ``ok``: the slide opened and every planned tile was read;
* ``clear_error``: a ``HistometError`` (one line, with a hint), or a native
  decode error on descriptor 2 that the client turns into one;
* ``unexpected_exception``: any other Python exception, a defect;
* ``crash``: the child died from a signal;
* ``hang``: the child ran past the per-case timeout and was killed.

Usage (needs the ``fuzz`` extra: ``pip install -e ".[fuzz]"``)::

    python benchmarks/fuzz.py [--cases 1000] [--timeout-s 30] [--page docs/reliability.md]

The figures replace the fuzz section of the results page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tifffile

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "slides"
SOURCES = (
    "CMU-1-Small-Region.svs",
    "pathml_smalltif.tif",
    "pathml_small_HE_levels.tiff",
    "kidney-48-5.tif",
)
INTERESTING_INTS = (0, 1, 2, 7, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)
MAX_TILES = 64
OUTCOMES = ("ok", "clear_error", "unexpected_exception", "crash", "hang")


@dataclass(frozen=True)
class Source:
    name: str
    data: bytes
    # Offsets of TIFF structure: IFDs, tag entries and tag values.
    structure_offsets: tuple[int, ...]
    mpp_override: float | None


def load_source(name: str) -> Source:
    from histomet.errors import HistometError
    from histomet.errors import MissingMppError
    from histomet.slide import open_slide

    path = SLIDES / name
    offsets = {4}
    with tifffile.TiffFile(path) as tiff:
        for page in tiff.pages:
            offsets.add(page.offset)
            for tag in page.tags.values():
                offsets.update((tag.offset, tag.valueoffset))
    try:
        with open_slide(path):
            mpp_override = None
    except MissingMppError:
        mpp_override = 0.5
    except HistometError:
        # A source that the reader rejects whole (kidney-48-5.tif is 16-bit
        # grayscale) still exercises the header checks.
        mpp_override = None
    size = path.stat().st_size
    return Source(
        name=name,
        data=path.read_bytes(),
        structure_offsets=tuple(sorted(o for o in offsets if 0 <= o < size)),
        mpp_override=mpp_override,
    )


def mutate(source: Source, mutations: list[tuple]) -> bytes:
    """Apply ``mutations`` in order; each is a tuple drawn by ``case_strategy``."""
    data = bytearray(source.data)
    for kind, *values in mutations:
        if not data:
            break
        if kind == "truncate":
            del data[int(values[0] * len(data)) :]
        elif kind == "flip":
            position = int(values[0] * len(data)) % len(data)
            data[position] ^= values[1] or 1
        elif kind == "zero":
            start = int(values[0] * len(data)) % len(data)
            data[start : start + values[1]] = bytes(
                len(data[start : start + values[1]])
            )
        elif kind == "structure":
            offset_index, delta, value, width = values
            offsets = source.structure_offsets
            position = offsets[offset_index % len(offsets)] + delta
            if 0 <= position <= len(data) - width:
                data[position : position + width] = (
                    value % (1 << (8 * width))
                ).to_bytes(width, "little")
    return bytes(data)


def case_strategy(sources: list[Source]):
    from hypothesis import strategies as st

    fraction = st.floats(0.0, 1.0, allow_nan=False)
    mutation = st.one_of(
        st.tuples(st.just("truncate"), fraction),
        st.tuples(st.just("flip"), fraction, st.integers(0, 255)),
        st.tuples(st.just("zero"), fraction, st.integers(1, 1 << 16)),
        st.tuples(
            st.just("structure"),
            st.integers(0, 10_000),
            st.integers(-4, 12),
            st.sampled_from(INTERESTING_INTS),
            st.sampled_from((1, 2, 4, 8)),
        ),
    )
    return st.tuples(
        st.integers(0, len(sources) - 1), st.lists(mutation, min_size=1, max_size=4)
    )


def _read_slide(path: Path, mpp_override: float | None, report) -> None:
    """Run the public slide API on ``path``; runs in the forked child."""
    from histomet.client.native_output import NativeOutputMonitor
    from histomet.errors import HistometError
    from histomet.slide import iter_tile_batches
    from histomet.slide import open_slide
    from histomet.slide import plan_slide_tiles

    try:
        with NativeOutputMonitor(()) as monitor:
            with open_slide(path, mpp_override=mpp_override) as slide:
                _, grid = plan_slide_tiles(slide, tile_px=512, target_mpp=0.5)
                tiles = 0
                for batch in iter_tile_batches(slide, grid, 8):
                    tiles += len(batch.tiles)
                    if tiles >= MAX_TILES:
                        break
            decode_errors = monitor.decode_errors_since(0)
        if decode_errors:
            report({"outcome": "clear_error", "detail": "native decode error"})
        else:
            report({"outcome": "ok", "detail": f"{tiles} tiles"})
    except HistometError as error:
        report({"outcome": "clear_error", "detail": type(error).__name__})
    except Exception as error:  # noqa: BLE001 - the defect being looked for
        frames = traceback.extract_tb(error.__traceback__)
        ours = [f for f in frames if "/histomet/" in f.filename]
        where = ours[-1] if ours else frames[-1]
        report(
            {
                "outcome": "unexpected_exception",
                "detail": f"{type(error).__name__}: {str(error)[:160]}",
                "where": f"{Path(where.filename).name}:{where.lineno} in {where.name}"
                f" (raised in {Path(frames[-1].filename).name}:{frames[-1].lineno})",
            }
        )


def run_case(path: Path, mpp_override: float | None, timeout_s: float) -> dict:
    """Fork a child that reads ``path``; return its outcome, crash or hang included."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)

        def report(outcome: dict) -> None:
            os.write(write_end, json.dumps(outcome).encode())

        try:
            _read_slide(path, mpp_override, report)
        finally:
            os._exit(0)
    os.close(write_end)
    outcome = None
    while time.monotonic() - started < timeout_s:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        return {"outcome": "hang", "detail": f"over {timeout_s:g} s"}
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        outcome = {"outcome": "crash", "detail": name}
    elif data:
        outcome = json.loads(data)
    else:
        outcome = {"outcome": "crash", "detail": f"exit {os.WEXITSTATUS(status)}"}
    outcome["seconds"] = round(time.monotonic() - started, 3)
    return outcome


def fuzz(cases: int, timeout_s: float, work_dir: Path) -> list[dict]:
    from hypothesis import HealthCheck
    from hypothesis import given
    from hypothesis import settings

    sources = [load_source(name) for name in SOURCES]
    records: list[dict] = []
    pristine = {}
    for source in sources:
        path = work_dir / f"pristine{Path(source.name).suffix}"
        path.write_bytes(source.data)
        pristine[source.name] = run_case(path, source.mpp_override, timeout_s)

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=("generate",),
    )
    @given(case_strategy(sources))
    def one_case(case) -> None:
        source_index, mutations = case
        source = sources[source_index]
        path = work_dir / f"case{Path(source.name).suffix}"
        path.write_bytes(mutate(source, mutations))
        outcome = run_case(path, source.mpp_override, timeout_s)
        records.append({"source": source.name, "mutations": mutations, **outcome})
        if len(records) % 100 == 0:
            print(f"{len(records)} cases", file=sys.stderr, flush=True)

    one_case()
    return records, pristine


def render(
    records: list[dict], pristine: dict, elapsed_s: float, timeout_s: float
) -> str:
    by_source: dict[str, Counter] = {}
    for record in records:
        by_source.setdefault(record["source"], Counter())[record["outcome"]] += 1
    total = Counter(record["outcome"] for record in records)
    lines = [
        "## Fuzz: mutated and truncated slides",
        "",
        f"`python benchmarks/fuzz.py --cases {len(records)} --timeout-s {timeout_s:g}`"
        f" on {platform.machine()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores shared with other jobs; {elapsed_s / 60:.1f} min. "
        "Cases are drawn by Hypothesis with a fixed seed (`derandomize`), so a "
        "rerun repeats them.",
        "",
        "| source | unmodified file | cases | " + " | ".join(OUTCOMES) + " |",
        "|---|---|---|" + "---|" * len(OUTCOMES),
    ]
    for source, counts in sorted(by_source.items()):
        cells = " | ".join(str(counts[o]) for o in OUTCOMES)
        base = pristine[source]
        base_text = f"{base['outcome']} ({base['detail']})"
        lines.append(f"| {source} | {base_text} | {sum(counts.values())} | {cells} |")
    cells = " | ".join(str(total[o]) for o in OUTCOMES)
    lines.append(f"| all | | {len(records)} | {cells} |")
    details = Counter(
        (r["outcome"], r["detail"]) for r in records if r["outcome"] != "ok"
    )
    lines += ["", "Outcomes other than `ok`, by detail:", ""]
    lines += ["| outcome | detail | cases |", "|---|---|---|"]
    for (outcome, detail), count in details.most_common(25):
        lines.append(f"| {outcome} | {detail.replace('|', '/')} | {count} |")
    lines += [
        "",
        "An unexpected exception is a reader defect. In a batch run it becomes "
        "that slide's error line (kind `unexpected TypeError` and so on) and the "
        "run goes on. A crash would end only the batch run's worker process, "
        "which is restarted.",
    ]
    defects = [r for r in records if r["outcome"] in OUTCOMES[2:]]
    if defects:
        lines += ["", "First defects, with the mutations that reproduce them:", ""]
        for record in defects[:10]:
            where = f" at {record['where']}" if "where" in record else ""
            lines.append(
                f"* {record['source']}: {record['outcome']} ({record['detail']}"
                f"{where}) after `{record['mutations']}`"
            )
    return "\n".join(lines) + "\n"


def replace_section(page: Path, heading: str, body: str) -> None:
    """Replace the ``## heading`` section of ``page`` with ``body``, or append it."""
    text = page.read_text() if page.exists() else ""
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body if text else body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[end + 1 :] if end >= 0 else "")
    page.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--records", type=Path, help="also write every case as JSON")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="histomet-fuzz-") as work_dir:
        records, pristine = fuzz(args.cases, args.timeout_s, Path(work_dir))
    elapsed_s = time.monotonic() - started
    body = render(records, pristine, elapsed_s, args.timeout_s)
    replace_section(args.page, "## Fuzz: mutated and truncated slides", body)
    if args.records is not None:
        args.records.write_text(json.dumps(records, indent=1))
    print(body)


if __name__ == "__main__":
    main()
