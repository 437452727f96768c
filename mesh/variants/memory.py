"""Peak memory of one variant, measured in a fresh process.

``python -m mesh.variants.memory FORMAT ARTIFACT INPUTS.npz THREADS`` imports
the format's runtime, resets the process's resident-set high-water mark
(``/proc/self/clear_refs``; where that is refused, the mark since start is
used), loads the artifact, runs the batch in ``INPUTS.npz`` (positional
arrays ``arr_0``, ``arr_1``, ...) twice and prints one JSON line:
``{"peak_bytes": N, "baseline_bytes": B}``, where ``N`` is the high-water mark
minus the resident size before loading. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from mesh.runtimes import runtime_for

__all__ = ["main"]


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _reset_high_water_mark() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then counts from process start; the baseline below still applies


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    fmt, artifact, inputs_file, threads = argv
    runtime = runtime_for(fmt)
    with np.load(inputs_file) as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    baseline = _status_kb("VmRSS")
    _reset_high_water_mark()
    session = runtime.load(artifact, threads=int(threads))
    for _ in range(2):
        runtime.run(session, inputs)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": max(peak - baseline, 0) * 1024,
                      "baseline_bytes": baseline * 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
