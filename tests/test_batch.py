"""Batch runs of ``histomet-client predict``: inputs, shards, resume, failures, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histomet.client.batch import SlideInput
from histomet.client.batch import expand_inputs
from histomet.client.batch import select_shard

from .conftest import CMU_SMALL

CLIENT = Path(sys.executable).parent / "histomet-client"
KEY_ENV = {"HISTOMET_SLIDE_ID_KEY": "batch-test-key"}


def run_client(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **KEY_ENV},
    )


def read_rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def make_slide_folder(folder: Path, names: list[str]) -> list[Path]:
    """Link the small CMU slide under each name; the content stays outside the repo."""
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(CMU_SMALL)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def solo_risk(triton_server) -> float:
    completed = run_client(
        "predict", str(CMU_SMALL), "--url", triton_server.grpc_url, "--json", "-"
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)["risk"]["probability"]


def test_folder_scan_rule(tmp_path):
    make_slide_folder(tmp_path, ["b.svs", "a.TIF", "sub/c.ndpi", ".hidden.svs"])
    (tmp_path / "notes.txt").write_text("not a slide")
    dicom = tmp_path / "dicom_slide"
    dicom.mkdir()
    (dicom / "level0.dcm").write_bytes(b"")
    (dicom / "level1.dcm").write_bytes(b"")

    inputs = expand_inputs([tmp_path], None)

    names = [item.path.relative_to(tmp_path).as_posix() for item in inputs]
    assert names == ["a.TIF", "b.svs", "dicom_slide", "sub/c.ndpi"]
    assert [item.row for item in inputs] == [0, 1, 2, 3]


def test_manifest_paths_relative_to_its_folder(tmp_path):
    make_slide_folder(tmp_path / "data", ["x.svs", "y.svs"])
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("case,path\n1,x.svs\n2,y.svs\n3,missing.svs\n")
    extra = tmp_path / "first.svs"

    inputs = expand_inputs([extra], manifest)

    assert [item.path for item in inputs] == [
        extra,
        tmp_path / "data" / "x.svs",
        tmp_path / "data" / "y.svs",
        tmp_path / "data" / "missing.svs",
    ]
    assert [item.listed_as for item in inputs][1:] == [
        "x.svs",
        "y.svs",
        "missing.svs",
    ]


def test_repeated_rows_are_predicted_once(tmp_path, caplog):
    slides = make_slide_folder(tmp_path / "data", ["x.svs", "y.svs"])
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path\nx.svs\ny.svs\nx.svs\n./y.svs\nx.svs\n")

    inputs = expand_inputs([slides[0]], manifest)

    # Only exact repeats go: the same file listed another way keeps its row.
    assert [item.listed_as for item in inputs] == [
        str(slides[0]),
        "x.svs",
        "y.svs",
        "./y.svs",
    ]
    assert [item.row for item in inputs] == [0, 1, 2, 3]
    assert "2 input rows repeat an earlier row" in caplog.text


def test_results_file_cannot_be_an_input(tmp_path):
    slides = make_slide_folder(tmp_path / "data", ["x.svs", "y.svs"])
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path\nx.svs\n")
    before = slides[1].read_bytes()
    for args in (
        [str(slides[1]), "--results", str(slides[1])],
        [str(tmp_path / "data"), "--results", str(slides[0])],
        ["--manifest", str(manifest), "--results", str(manifest)],
    ):
        completed = run_client("predict", *args)
        assert completed.returncode == 2, args
        assert "--results points at an input slide or the manifest" in completed.stderr
    assert slides[1].read_bytes() == before
    assert manifest.read_text() == "path\nx.svs\n"


def test_shards_cover_input_exactly_once():
    inputs = [SlideInput(row, Path(f"{row}.svs"), f"{row}.svs") for row in range(23)]
    for count in (1, 2, 3, 5, 23, 40):
        rows = [
            item.row
            for index in range(count)
            for item in select_shard(inputs, index, count)
        ]
        assert sorted(rows) == list(range(23)), count
        assert len(rows) == len(set(rows)), count


def test_invalid_shard_and_manifest_exit_2(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide\nx.svs\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a slide")
    for args, expected in (
        (["--shard", "2/2"], "out of range"),
        (["--shard", "1"], "is not INDEX/COUNT"),
        (["--shard=-1/2"], "is not INDEX/COUNT"),
        (["--manifest", str(manifest)], "has no 'path' column"),
        ([str(CMU_SMALL), str(CMU_SMALL), "--json", "x.json"], "--results"),
        ([], "no slide given"),
        ([str(empty)], "no slides found"),
    ):
        completed = run_client("predict", *args)
        assert completed.returncode == 2, args
        assert expected in completed.stderr, args
        assert "Traceback" not in completed.stderr, args


def test_batch_records_bad_slide_and_resumes(triton_server, tmp_path, solo_risk):
    folder = tmp_path / "slides"
    make_slide_folder(folder, ["Doe_Jane_1.svs", "nested/Doe_Jane_2.svs"])
    bad = folder / "Doe_Jane_corrupt.svs"
    bad.write_text("this is not a slide\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\nslides/Doe_Jane_1.svs\nslides/Doe_Jane_missing.svs\n")
    results = tmp_path / "out.jsonl"
    args = ["predict", str(folder), "--manifest", str(manifest)]
    args += ["--url", triton_server.grpc_url, "--results", str(results)]

    first = run_client(*args)
    rows = read_rows(results)
    second = run_client(*args)
    rows_after_rerun = read_rows(results)

    assert first.returncode == 3, first.stderr
    assert [row["input_row"] for row in rows] == [0, 1, 2, 3, 4]
    statuses = [row["status"] for row in rows]
    assert statuses == ["ok", "error", "ok", "ok", "error"]
    assert "failed to open the slide" in rows[1]["error"]["message"]
    assert rows[1]["error"]["exit_code"] == 3
    assert rows[1]["slide"]["id"] is not None
    assert "slide not found" in rows[4]["error"]["message"]
    assert rows[4]["slide"]["id"] is None
    for index in (0, 2, 3):
        assert rows[index]["risk"]["probability"] == solo_risk, index
    assert len({row["input_key"] for row in rows}) == 5
    assert "Doe_Jane" not in results.read_text()
    assert "Doe_Jane" not in first.stdout + first.stderr
    assert "5 slides: 3 predicted, 0 without tissue, 2 failed" in first.stdout
    # The rerun predicts only the two failed slides again, and they fail again.
    assert second.returncode == 3, second.stderr
    assert "3 finished in an earlier run" in second.stdout
    assert rows_after_rerun[:5] == rows
    assert [row["input_row"] for row in rows_after_rerun[5:]] == [1, 4]


def test_shard_runs_together_cover_input_once(triton_server, tmp_path):
    make_slide_folder(tmp_path / "in", [f"s{index}.svs" for index in range(5)])
    seen = []
    for index in range(2):
        results = tmp_path / f"shard-{index}.jsonl"
        completed = run_client(
            "predict",
            str(tmp_path / "in"),
            "--url",
            triton_server.grpc_url,
            "--shard",
            f"{index}/2",
            "--results",
            str(results),
            "--progress",
            "none",
        )
        assert completed.returncode == 0, completed.stderr
        seen += [row["input_row"] for row in read_rows(results)]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_results_on_stdout_without_results_file(triton_server, tmp_path):
    make_slide_folder(tmp_path, ["a.svs", "b.svs"])

    completed = run_client(
        "predict", str(tmp_path), "--url", triton_server.grpc_url, "--progress", "none"
    )

    lines = completed.stdout.splitlines()
    assert completed.returncode == 0, completed.stderr
    assert [json.loads(line)["status"] for line in lines] == ["ok", "ok"]
    assert "2 slides: 2 predicted" in completed.stderr


def test_ctrl_c_keeps_finished_results(triton_server, tmp_path):
    """A real SIGINT mid-run: whole lines only, exit 130, and a rerun completes."""
    make_slide_folder(tmp_path / "in", [f"s{index:02d}.svs" for index in range(12)])
    results = tmp_path / "out.jsonl"
    args = [str(CLIENT), "predict", str(tmp_path / "in")]
    args += ["--url", triton_server.grpc_url, "--results", str(results)]
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **KEY_ENV},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    interrupted_rows = read_rows(results)

    rerun = run_client(*args[1:], "--progress", "none")
    all_rows = read_rows(results)

    assert process.returncode == 130, stderr
    assert "interrupted" in stdout
    assert 2 <= len(interrupted_rows) < 12
    assert {row["status"] for row in interrupted_rows} == {"ok"}
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(interrupted_rows)} finished in an earlier run" in rerun.stdout
    assert sorted(row["input_row"] for row in all_rows) == list(range(12))


def test_progress_bar_on_terminal(triton_server, tmp_path):
    import pty

    make_slide_folder(tmp_path, ["a.svs", "b.svs"])
    results = tmp_path / "out.jsonl"
    primary, secondary = pty.openpty()
    completed = subprocess.run(
        [str(CLIENT), "predict", str(tmp_path), "--url", triton_server.grpc_url]
        + ["--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**os.environ, **KEY_ENV},
        timeout=120,
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)

    assert completed.returncode == 0
    assert b"\r[" in output
    assert b"2/2" in output
