"""The cuCIM probe: a native crash in cuCIM falls back instead of killing the process.

The crash is real: the probe child dereferences a null pointer after importing
cuCIM (``HISTOMET_PROBE_CRASH_FOR_TESTS``), and dies with SIGSEGV, as cuCIM 26.10
does on some generic tiled TIFFs. No shared file reproduces that crash with the
cuCIM 26.6 installed here, so the hook replaces such a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from histomet.errors import SlideOpenError
from histomet.slide import open_slide
from histomet.slide import probe

CRASH_ENV = "HISTOMET_PROBE_CRASH_FOR_TESTS"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    probe.clear_probe_cache()
    yield
    probe.clear_probe_cache()


def test_probe_ok_on_svs(shared_slides: Path) -> None:
    result = probe.probe_cucim(shared_slides / "CMU-1-Small-Region.svs")

    assert result.outcome == "ok"
    assert result.ok


def test_probe_reports_unsupported_format(shared_slides: Path) -> None:
    path = shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi"

    result = probe.probe_cucim(path)

    assert result.outcome == "error"
    assert "Cannot find a plugin" in result.detail
    assert str(path) not in result.detail
    assert path.name not in result.detail


def test_probe_survives_segfault(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_ENV, "1")

    result = probe.probe_cucim(shared_slides / "CMU-1-Small-Region.svs")

    assert result.outcome == "crashed"
    assert "SIGSEGV" in result.detail


def test_segfault_falls_back_to_openslide(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_ENV, "1")

    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as slide:
        info = slide.info

    assert info.reader == "openslide"
    assert info.dimensions == (2220, 2967)
    assert len(info.warnings) == 1
    assert "crashed" in info.warnings[0]
    assert "SIGSEGV" in info.warnings[0]


def test_segfault_with_forced_cucim_raises(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_ENV, "1")

    with pytest.raises(SlideOpenError) as caught:
        open_slide(shared_slides / "CMU-1-Small-Region.svs", reader="cucim")

    assert "SIGSEGV" in str(caught.value)
    assert "Supported formats" in str(caught.value)


def test_probe_result_is_cached(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    original = probe._run_child

    def counting_run(path: Path, timeout_s: float) -> probe.ProbeResult:
        calls.append(path)
        return original(path, timeout_s)

    monkeypatch.setattr(probe, "_run_child", counting_run)
    path = shared_slides / "CMU-1-Small-Region.svs"

    first = probe.probe_cucim(path)
    second = probe.probe_cucim(path)
    with open_slide(path) as slide:
        reader = slide.info.reader

    assert first == second
    assert len(calls) == 1
    assert reader == "cucim"


def test_changed_file_is_probed_again(
    shared_slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "copy.svs"
    path.write_bytes((shared_slides / "CMU-1-Small-Region.svs").read_bytes())
    assert probe.probe_cucim(path).ok

    # Same inode, new size and mtime: the cached result must not be reused.
    path.write_bytes(b"not a slide any more")
    result = probe.probe_cucim(path)

    assert result.outcome == "error"


def test_probe_timeout(shared_slides: Path) -> None:
    result = probe.probe_cucim(
        shared_slides / "CMU-1-Small-Region.svs", timeout_s=0.001
    )

    assert result.outcome == "timed_out"
    assert "0.001 s" in result.detail
