"""What every benchmark script ends with: its results as JSON in benchmarks/results/."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(results: dict, name: str) -> Path:
    """Write ``results`` to benchmarks/results/<name>.json, say where, and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(RESULTS.parents[1])}")
    return out
