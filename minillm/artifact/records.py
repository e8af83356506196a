"""Result records of the paper harness: one JSON per run with its configuration hash and provenance, written
atomically and looked up again as a cache. The only place that knows where the repository's folders are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from ..provenance import provenance

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_hash(config: Any) -> str:
    """A stable hash of a record's effective configuration (canonical JSON: sorted keys, lists for tuples)."""
    import hashlib

    text = json.dumps(json.loads(json.dumps(config)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two configurations differ (after a JSON round trip), e.g. ['options.queries']."""
    a, b = json.loads(json.dumps(stored)), json.loads(json.dumps(expected))
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(dict.fromkeys([*b, *a])):
            key = f"{prefix}{k}"
            if k not in a:
                out.append(f"{key} (missing in the record)")
            elif k not in b:
                out.append(f"{key} (not in the profile)")
            else:
                out += config_diff(a[k], b[k], key + ".")
        return out
    if a != b:
        return [f"{prefix.rstrip('.') or 'config'}: {a!r} -> {b!r}"]
    return []


def load_record(path: Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def save_record(
    path: Path,
    experiment: str,
    config: dict,
    metrics: dict,
    wall_time_s: float | None = None,
    device: Any = None,
    extra: dict | None = None,
) -> dict:
    record = {
        "experiment": experiment,
        "config": config,
        "config_hash": config_hash(config),
        "metrics": metrics,
        "wall_time_s": wall_time_s,
        "provenance": provenance(device),
        **(extra or {}),
    }
    write_json_atomic(path, record)
    return record
