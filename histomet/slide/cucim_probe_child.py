"""Child process of the cuCIM probe: open a file with cuCIM and read two regions.

Run as a script (``python cucim_probe_child.py PATH``), never imported, so it loads
nothing but cuCIM and numpy. It prints one JSON line: ``{"ok": true}`` or
``{"ok": false, "error": "..."}``. A native crash kills it before it prints.

``HISTOMET_PROBE_CRASH_FOR_TESTS=1`` makes it dereference a null pointer after
importing cuCIM, a real SIGSEGV that tests use to prove the parent survives one.
"""

import ctypes
import json
import os
import sys


def main() -> int:
    path = sys.argv[1]
    from cucim import CuImage

    if os.environ.get("HISTOMET_PROBE_CRASH_FOR_TESTS") == "1":
        ctypes.string_at(0)

    try:
        image = CuImage(path)
        dimensions = image.resolutions["level_dimensions"]
        last = len(dimensions) - 1
        for level in (0, last):
            width, height = dimensions[level]
            size = (min(16, int(width)), min(16, int(height)))
            image.read_region(location=(0, 0), size=size, level=level)
        image.close()
    except Exception as error:  # noqa: BLE001 - reported to the parent as text
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
