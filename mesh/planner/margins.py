"""The planner's safety margins, derived from measured prediction error.

``benchmarks/prediction.py`` runs the local mesh, compares each query's
predicted latency with the latency the client measured, and writes the error
per tier to ``benchmarks/results/prediction.json``. Systematic error goes
into the model (``Planner.per_hop_ms`` is fitted by the same run); what is
left sets the margin: the 90th percentile of the planner's optimism
(measured - predicted, when positive) per tier, rounded up to 0.5 ms. The
planner adds it (after ``margin_frac``) before checking a latency target.
Re-run the benchmark after changing the planner's model or the data plane
and copy its ``suggested_margin_ms`` here; ``load_margins`` reads the file
directly for experiments.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CALIBRATED_MARGIN_MS", "load_margins"]

#: tier -> milliseconds, from benchmarks/prediction.py (400 queries per class) on the 2-core
#: development machine with nodes forwarding over the msgpack stream and
#: Planner.per_hop_ms = 1.6 (fitted at 1.56 and 1.59 by two runs, 1.62 by the run that checked
#: it): that run's suggested_margin_ms (0.5, 1.0, 0.5), raised to cover each tier's median
#: absolute error (core: 0.83 ms, the planner being pessimistic there). Under heavy CPU
#: contention from other work forwarded queries were up to ~7 ms slower than predicted at
#: p90; these margins do not cover that.
CALIBRATED_MARGIN_MS: dict[str, float] = {"edge": 0.5, "intermediate": 1.0, "core": 1.0}


def load_margins(path: str | Path) -> dict[str, float]:
    """The ``suggested_margin_ms`` of a prediction benchmark result file."""
    data = json.loads(Path(path).read_text())
    return {str(tier): float(ms) for tier, ms in data["suggested_margin_ms"].items()}
