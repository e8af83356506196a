"""The record of what a pruning run kept: per decoder layer, the surviving heads and channels in original indices.

`pruning.json` is this record serialised; `load_pruned` rebuilds a model from it, so it is validated strictly.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: the checksum covers every field; 1: only the architecture and the kept indices
READABLE_VERSIONS = (1, 2)


class PlanError(ValueError):
    """A pruning plan (or pruning.json) that is malformed or does not fit the model."""


def plan_checksum(architecture: Any, layers: list) -> str:
    """The checksum of format 1: SHA-256 of the architecture and the kept indices (canonical JSON). Kept to check
    files written before format 2; it left out fields that change what a later step does (`base_model`,
    `prunable_params_original`, `sparsity`, ...)."""
    layers = [lk.to_json() if isinstance(lk, OriginalKeep) else lk for lk in layers]
    text = json.dumps({"architecture": architecture, "layers": layers}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def document_checksum(d: dict) -> str:
    """The checksum of format 2: SHA-256 of every field of pruning.json but the checksum (canonical JSON, after a
    JSON round trip so that the writer and the reader hash the same values). Any edit is caught: the kept indices,
    the architecture, and the fields a re-prune, `recover` or `load_pruned` act on (`base_model`,
    `prunable_params_original`, `sparsity`, `weights_sha256`, ...)."""
    body = json.loads(json.dumps({k: v for k, v in d.items() if k != "checksum"}))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class OriginalKeep:
    """Surviving units of one decoder layer, as ascending indices into the *original* (unpruned) layer. (Surgery
    and allocation work in current indices, `minillm.surgery.CurrentKeep`.)"""

    kept_query_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]

    def to_json(self) -> dict:
        return {
            "attention": {"kept_query_heads": self.kept_query_heads, "kept_kv_heads": self.kept_kv_heads},
            "mlp": {"kept_channels": self.kept_channels},
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> OriginalKeep:
        try:
            att, mlp = d["attention"], d["mlp"]
            keep = cls(list(att["kept_query_heads"]), list(att["kept_kv_heads"]), list(mlp["kept_channels"]))
        except (KeyError, TypeError) as e:
            raise PlanError(
                f"{where}: expected {{'attention': {{'kept_query_heads', 'kept_kv_heads'}}, "
                f"'mlp': {{'kept_channels'}}}}, missing {e}"
            ) from None
        for name, idx in asdict(keep).items():
            if not all(isinstance(i, int) and i >= 0 for i in idx) or idx != sorted(set(idx)):
                raise PlanError(f"{where}: {name} must be ascending distinct non-negative integers")
        return keep


def _check_checksum(d: dict, where: str) -> None:
    """Refuse a pruning.json edited after it was written. Format 2 covers every field; format 1 files (older
    minillm) are checked by their own checksum, which covers only the architecture and the kept indices, and load
    with a warning saying so; a file without a checksum loads with a warning."""
    if "checksum" not in d:
        warnings.warn(
            f"{where}: no checksum (written by an older minillm); the kept indices cannot be verified",
            UserWarning,
            stacklevel=3,
        )
        return
    if d["format_version"] == 1:
        expected, covered = plan_checksum(d["architecture"], d["layers"]), "the kept indices or the architecture"
    else:
        expected, covered = document_checksum(d), "a field (kept indices, architecture, base_model, sizes, ...)"
    if d["checksum"] != expected:
        raise PlanError(
            f"{where}: checksum mismatch: {covered} changed after the file was written (re-create it with "
            "minillm.save_pruned)"
        )
    if d["format_version"] == 1:
        warnings.warn(
            f"{where}: format 1 (an older minillm): its checksum covers only the architecture and the kept indices, "
            "so edits of base_model, sizes or sparsity cannot be detected; save it again to upgrade",
            UserWarning,
            stacklevel=3,
        )


@dataclass
class PruningPlan:
    """What `minillm.prune` did. `sparsity` is the requested fraction of prunable parameters (decoder-layer linear
    weights and biases) to remove; `achieved_sparsity` what was removed relative to the original model."""

    base_model: str
    architecture: dict
    layers: list[OriginalKeep]
    method: str = "none"
    sparsity: float = 0.0
    achieved_sparsity: float = 0.0
    prunable_params_original: int = 0
    prunable_params_kept: int = 0
    options: dict = field(default_factory=dict)
    seed: int | None = None
    calibration: dict | None = None
    base_revision: str | None = None
    history: list[dict] = field(default_factory=list)
    recovery: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    # earlier pruning steps of a model pruned more than once (oldest first): method, sparsity, options, history, ...
    previous_steps: list[dict] = field(default_factory=list)
    # SHA-256 of model.safetensors, set by save_pruned: load_pruned refuses weights that belong to another plan
    weights_sha256: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [lk.to_json() for lk in self.layers]
        d = {"format_version": FORMAT_VERSION, **d}
        return {**d, "checksum": document_checksum(d)}

    def step_summary(self) -> dict:
        """This plan's own step (everything but the kept indices), as kept in `previous_steps` of a later plan."""
        d = asdict(self)
        for key in ("layers", "previous_steps", "base_model", "base_revision", "architecture", "weights_sha256"):
            d.pop(key)
        return d

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: Any, where: str = "pruning.json") -> PruningPlan:
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a JSON object")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise PlanError(
                f"{where}: unsupported format_version {d.get('format_version')!r} (this minillm reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}; a newer minillm wrote it?)"
            )
        for key in ("base_model", "architecture", "layers"):
            if key not in d:
                raise PlanError(f"{where}: missing required field {key!r}")
        if not isinstance(d["layers"], list):
            raise PlanError(f"{where}: 'layers' must be a list")
        layers = [OriginalKeep.from_json(x, f"{where}: layers[{i}]") for i, x in enumerate(d["layers"])]
        _check_checksum(d, where)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "layers"}
        return cls(layers=layers, **known)

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: not found (is this a directory written by minillm.save_pruned?)") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: corrupt JSON ({e})") from None
        return cls.from_json(d, str(path))

    def widths(self) -> list[dict]:
        """Per layer: numbers of kept query heads, KV heads and channels."""
        return [
            {"query_heads": len(k.kept_query_heads), "kv_heads": len(k.kept_kv_heads), "channels": len(k.kept_channels)}
            for k in self.layers
        ]
