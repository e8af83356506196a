"""minillm: forward-only structured pruning of LLMs (MINI-LLM's FMS score, Bonsai) with the baselines they are
compared against, exact physical removal, pickle-free save/reload, evaluation and measurement."""

from .adapters import UnsupportedArchitectureError, get_adapter
from .checkpoint import load_pruned, save_pruned
from .export import ExportError, export_pretrained
from .gguf_export import export_gguf
from .models import load_model
from .plan import OriginalKeep, PlanError, PruningPlan
from .prune import allocate_units, make_plan, prune, remove_units, score
from .state import PruningState, pruning_state
from .surgery import CurrentKeep, GQAConstraintError, VirtualMasks

__version__ = "0.1.0"

__all__ = [
    "CurrentKeep",
    "ExportError",
    "GQAConstraintError",
    "OriginalKeep",
    "PlanError",
    "PruningPlan",
    "PruningState",
    "UnsupportedArchitectureError",
    "VirtualMasks",
    "allocate_units",
    "export_pretrained",
    "export_gguf",
    "get_adapter",
    "load_model",
    "load_pruned",
    "make_plan",
    "prune",
    "pruning_state",
    "remove_units",
    "save_pruned",
    "score",
    "__version__",
]
