"""`--grid NAME=V1,V2 ...`: the parameter sets `hbreg tune` replays, the cartesian product of the lists.

Names are the settings the detection rules read (`processors.liveness.rules_of`), values are written as
their `HBREG_*` variables take them (`stall_timeout=5s,10s`, `phi_threshold=6,8`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from heartbeat_registry.core.settings import Settings, parse_field
from heartbeat_registry.errors import ConfigError

TUNABLE = (
    "stall_timeout",
    "phi_threshold",
    "acceptable_pause",
    "min_std",
    "recovery_beats",
    "hung_cpu",
    "max_task_duration",
    "mass_silence_fraction",
    "mass_silence_min",
    "mass_silence_hold",
    "lag_alert",
)
MAX_SETS = 256


def parse(specs: list[str]) -> list[dict[str, Any]]:
    """The parameter sets of `specs`, each a dict of setting name -> value (empty: no grid)."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--grid: expected NAME=VALUE[,VALUE...], got {spec!r}")
        if name not in TUNABLE:
            raise ConfigError(f"--grid: unknown parameter {name!r}; tunable: {', '.join(TUNABLE)}")
        if name in axes:
            raise ConfigError(f"--grid: {name} given twice")
        raw = [v for v in (v.strip() for v in values.split(",")) if v]
        if not raw:
            raise ConfigError(f"--grid {name}: no values")
        axes[name] = list(dict.fromkeys(parse_field(name, v, f"--grid {name}") for v in raw))
    count = 1
    for axis in axes.values():
        count *= len(axis)
    if count > MAX_SETS:
        raise ConfigError(f"--grid: {count} parameter sets; at most {MAX_SETS} (each one is a replay)")
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())] if axes else []


def settings_for(live: Settings, params: dict[str, Any]) -> Settings:
    return dataclasses.replace(live, **params)


def describe(settings: Settings) -> dict[str, Any]:
    """The tunable settings' values, as the JSON shows a parameter set."""
    return {name: getattr(settings, name) for name in TUNABLE}
