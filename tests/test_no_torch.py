"""The client and serving paths run without torch."""

from __future__ import annotations

import subprocess
import sys

MODULES = (
    "histomet.client.cli",
    "histomet.client.predict",
    "histomet.client.stream",
    "histomet.serve.launcher",
    "histomet.export.repository",
    "histomet.slide",
    "histomet.cli",
)


def test_client_and_serving_modules_do_not_import_torch():
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in MODULES)
        + "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_backend_model_files_import_only_serving_packages():
    from importlib import resources

    package = resources.files("histomet.serve.triton_models")
    for name in ("patch_encoder.py", "mil.py"):
        source = package.joinpath(name).read_text()
        assert "import torch" not in source, name
        assert "import histomet" not in source, name
