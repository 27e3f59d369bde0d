"""Thresholds on metrics (`evaluate --thresholds`, `make eval`): a YAML of `name: minimum` or
`name: {min, max}`, read against one run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import yaml

from mmar_cli.errors import UserError


def check_thresholds(metrics: Dict[str, float], path: str | Path) -> List[str]:
    """Failures (one sentence each) of `metrics` against a YAML of `name: minimum` or `name: {min, max}`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"thresholds: {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict):
        raise UserError(f"thresholds: {path} must map metric names to minimums (e.g. gen.checker.all: 0.5)")
    failures = []
    for name, bound in spec.items():
        if name not in metrics:
            raise UserError(f"thresholds: {path}: metric '{name}' was not computed in this run; computed: "
                            f"{', '.join(sorted(metrics))}")
        bounds = bound if isinstance(bound, dict) else {"min": bound}
        if set(bounds) - {"min", "max"} or not all(isinstance(v, (int, float)) for v in bounds.values()):
            raise UserError(f"thresholds: {path}: '{name}' must be a number (minimum) or {{min: x, max: y}}, "
                            f"got {bound!r}")
        value = metrics[name]
        if "min" in bounds and not value >= bounds["min"]:
            failures.append(f"{name} = {value:.4g} is below the minimum {bounds['min']}")
        if "max" in bounds and not value <= bounds["max"]:
            failures.append(f"{name} = {value:.4g} is above the maximum {bounds['max']}")
    return failures
