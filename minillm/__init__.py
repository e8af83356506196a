"""minillm: forward-only structured pruning of LLMs (MINI-LLM's FMS score, Bonsai) with the baselines they are
compared against, exact physical removal, pickle-free save/reload, evaluation and measurement."""

from .adapters import UnsupportedArchitectureError, get_adapter
from .checkpoint import load_pruned, save_pruned
from .models import load_model
from .plan import LayerKeep, PlanError, PruningPlan
from .prune import prune, score
from .surgery import GQAConstraintError, VirtualMasks

__version__ = "0.1.0"

__all__ = [
    "GQAConstraintError",
    "LayerKeep",
    "PlanError",
    "PruningPlan",
    "UnsupportedArchitectureError",
    "VirtualMasks",
    "get_adapter",
    "load_model",
    "load_pruned",
    "prune",
    "save_pruned",
    "score",
    "__version__",
]
