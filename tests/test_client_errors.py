"""Bad input gives one clear line and a distinct exit code, and sends nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import tifffile

from .conftest import CMU_SMALL
from .conftest import free_port
from .conftest import loopback_config

CLIENT = Path(sys.executable).parent / "histomet-client"


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args], capture_output=True, text=True, timeout=120
    )


def ensemble_requests(server) -> float:
    """Return Triton's count of successful plus failed requests to the ensemble."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(
            ("nv_inference_request_success{", "nv_inference_request_failure{")
        ):
            if 'model="histomet"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def assert_one_line_error(
    completed: subprocess.CompletedProcess, exit_code: int
) -> str:
    assert completed.returncode == exit_code, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("histomet-client: error: ")
    assert "Traceback" not in completed.stderr
    return lines[0]


def test_missing_path_exit_3_without_path(triton_server, tmp_path):
    missing = tmp_path / "patient-0042.svs"

    line = assert_one_line_error(
        run_client("predict", str(missing), "--url", triton_server.grpc_url), 3
    )

    assert "slide not found" in line
    assert "patient-0042" not in line
    assert "--show-paths" in line


def test_missing_path_named_with_show_paths(triton_server, tmp_path):
    missing = tmp_path / "visible.svs"

    line = assert_one_line_error(
        run_client(
            "predict", str(missing), "--url", triton_server.grpc_url, "--show-paths"
        ),
        3,
    )

    assert str(missing) in line


def test_text_file_is_not_a_slide(triton_server, tmp_path):
    fake = tmp_path / "patient-0042.svs"
    fake.write_text("this is not a slide\n")
    before = ensemble_requests(triton_server)

    line = assert_one_line_error(
        run_client("predict", str(fake), "--url", triton_server.grpc_url), 3
    )

    assert "failed to open the slide" in line
    assert ensemble_requests(triton_server) == before


def test_native_reader_output_is_redacted(tmp_path):
    """libtiff prints the path to descriptor 2; the client replaces it."""
    fake = tmp_path / "patient-0042.svs"
    fake.write_text("this is not a slide\n")

    completed = run_client("--debug", "predict", str(fake))

    assert completed.returncode == 3
    assert "slide reader output on fd 2: <slide>" in completed.stderr
    assert "patient-0042" not in completed.stderr
    assert "patient-0042" not in completed.stdout


def test_server_not_running_exit_4(tmp_path):
    port = free_port()

    line = assert_one_line_error(
        run_client("predict", str(CMU_SMALL), "--url", f"127.0.0.1:{port}"), 4
    )

    assert f"cannot reach Triton at 127.0.0.1:{port}" in line
    assert "histomet serve" in line


def test_debug_shows_stack_trace(tmp_path):
    port = free_port()

    completed = run_client(
        "--debug", "predict", str(CMU_SMALL), "--url", f"127.0.0.1:{port}"
    )

    assert completed.returncode == 4
    assert "Traceback" in completed.stderr


def test_unknown_model_exit_4(triton_server):
    line = assert_one_line_error(
        run_client(
            "predict",
            str(CMU_SMALL),
            "--url",
            triton_server.grpc_url,
            "--model",
            "nope",
        ),
        4,
    )

    assert "'nope'" in line


def test_missing_mpp_sends_nothing(triton_server, shared_slides):
    slide = shared_slides / "tcga-cr-7395-01a-01-ts1.svs"
    before = ensemble_requests(triton_server)

    line = assert_one_line_error(
        run_client("predict", str(slide), "--url", triton_server.grpc_url), 3
    )

    assert "--mpp" in line
    assert ensemble_requests(triton_server) == before


def test_invalid_mpp_argument_exit_2():
    for value, expected in (
        ("-1", "finite number above 0"),
        ("nan", "finite number above 0"),
        ("inf", "finite number above 0"),
        ("1e9", "outside the plausible range"),
        ("0.01", "outside the plausible range"),
    ):
        completed = run_client("predict", str(CMU_SMALL), "--mpp", value)
        assert completed.returncode == 2, value
        assert expected in completed.stderr, value


def test_invalid_url_exit_2_without_connecting():
    for url, expected in (
        ("127.0.0.1:99999", "port must be 1 to 65535"),
        ("127.0.0.1:", "not a port number"),
        ("foo", "lacks a host or a port"),
        ("http://127.0.0.1:8001", "has a scheme"),
        ("", "lacks a host or a port"),
    ):
        completed = run_client("predict", str(CMU_SMALL), "--url", url)
        assert completed.returncode == 2, url
        assert expected in completed.stderr, url


def test_debug_accepted_after_subcommand(tmp_path):
    completed = run_client("predict", str(tmp_path / "absent.svs"), "--debug")

    assert completed.returncode == 3
    assert "Traceback" in completed.stderr


def test_fifo_is_not_a_slide(tmp_path):
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)

    line = assert_one_line_error(run_client("predict", str(fifo)), 3)

    assert "not a regular file or folder" in line


def test_json_onto_slide_rejected_before_work(tmp_path):
    slide = tmp_path / "copy.svs"
    shutil.copyfile(CMU_SMALL, slide)
    before = slide.read_bytes()

    line = assert_one_line_error(
        run_client("predict", str(slide), "--json", str(slide)), 2
    )

    assert "points at the input slide" in line
    assert slide.read_bytes() == before


def test_json_onto_folder_rejected_before_work(tmp_path):
    line = assert_one_line_error(
        run_client("predict", str(CMU_SMALL), "--json", str(tmp_path)), 2
    )

    assert "is a folder" in line
    assert list(tmp_path.iterdir()) == []


def test_json_to_character_device_written_in_place(triton_server):
    completed = run_client(
        "predict",
        str(CMU_SMALL),
        "--url",
        triton_server.grpc_url,
        "--json",
        "/dev/null",
    )

    assert completed.returncode == 0, completed.stderr
    assert Path("/dev/null").is_char_device()


def test_corrupt_tile_data_gives_no_prediction(triton_server, tmp_path):
    """Zeroed JPEG tile data: cuCIM prints libjpeg errors and returns pixels anyway."""
    data = bytearray(CMU_SMALL.read_bytes())
    data[300_000:700_000] = bytes(400_000)
    slide = tmp_path / "corrupt.svs"
    slide.write_bytes(data)
    output = tmp_path / "corrupt.json"
    before = ensemble_requests(triton_server)

    for reader in ("cucim", "openslide"):
        completed = run_client(
            "predict",
            str(slide),
            "--url",
            triton_server.grpc_url,
            "--reader",
            reader,
            "--json",
            str(output),
        )
        line = assert_one_line_error(completed, 3)
        assert "no prediction was made" in line, reader
        assert "risk" not in completed.stdout, reader
        assert not output.exists(), reader
    assert ensemble_requests(triton_server) == before


def test_blank_slide_reports_no_tissue(triton_server, tmp_path):
    rng = np.random.default_rng(0)
    white = (245 + rng.integers(-3, 4, size=(2048, 2048, 3))).astype(np.uint8)
    path = tmp_path / "blank.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            white,
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
            compression="zlib",
        )
    output = tmp_path / "blank.json"
    before = ensemble_requests(triton_server)

    completed = run_client(
        "predict", str(path), "--url", triton_server.grpc_url, "--json", str(output)
    )

    result = json.loads(output.read_text())
    assert completed.returncode == 5, completed.stderr
    assert "no tissue found" in completed.stdout
    assert result["status"] == "no_tissue"
    assert result["risk"] is None
    assert result["slide"]["tiles"] == 0
    assert ensemble_requests(triton_server) == before


def test_model_not_ready_exit_4(tiny_repository):
    """The server is up but the ensemble is unloaded: one line, exit 4, nothing sent."""
    import tritonclient.grpc as grpcclient

    from histomet.serve.launcher import LocalTritonServer

    config = loopback_config(tiny_repository)
    with LocalTritonServer(config) as server:
        grpcclient.InferenceServerClient(server.grpc_url).unload_model("histomet")

        line = assert_one_line_error(
            run_client("predict", str(CMU_SMALL), "--url", server.grpc_url), 4
        )

    assert "model 'histomet' is not ready on the server" in line


def test_library_log_lines_are_redacted(tmp_path):
    """tifffile names the file in its warnings; the client's log filter replaces it."""
    data = bytearray(CMU_SMALL.read_bytes())
    data[4:8] = bytes(4)  # first IFD offset: no pages
    slide = tmp_path / "patient-0042-ifd0.svs"
    slide.write_bytes(data)

    quiet = run_client("predict", str(slide), "--url", "127.0.0.1:1")
    debug = run_client("--debug", "predict", str(slide), "--url", "127.0.0.1:1")

    assert_one_line_error(quiet, 3)
    assert debug.returncode == 3
    assert "<slide>" in debug.stderr
    assert "patient-0042" not in debug.stderr + debug.stdout


def test_empty_slide_argument_exit_2():
    completed = run_client("predict", "")

    assert completed.returncode == 2
    assert "must not be empty" in completed.stderr


def test_file_name_not_utf8_is_handled(tmp_path):
    name = os.fsdecode(b"patient-0042-\xff.svs")
    slide = tmp_path / name
    slide.write_text("not a slide\n")

    line = assert_one_line_error(run_client("predict", str(slide)), 3)

    assert "patient-0042" not in line


def test_json_to_standard_output_through_a_pipe(triton_server):
    completed = run_client(
        "predict", str(CMU_SMALL), "--url", triton_server.grpc_url, "--json", "-"
    )

    result = json.loads(completed.stdout)
    assert completed.returncode == 0, completed.stderr
    assert result["slide"]["tiles"] == 14
    assert "DEMO WEIGHTS" in completed.stderr


def test_json_appended_to_redirected_stdout(triton_server, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("earlier line\n")
    with open(log, "a") as stream:
        completed = subprocess.run(
            [
                str(CLIENT),
                "predict",
                str(CMU_SMALL),
                "--url",
                triton_server.grpc_url,
                "--json",
                "/dev/stdout",
                "--quiet",
            ],
            stdout=stream,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )

    text = log.read_text()
    assert completed.returncode == 0, completed.stderr
    assert text.startswith("earlier line\n")
    assert json.loads(text[len("earlier line\n") :])["status"] == "ok"
