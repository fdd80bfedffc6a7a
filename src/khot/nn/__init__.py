"""Thin ``torch.nn`` modules over khot's functions: they hold arguments, nothing else."""

from .exact import TopK
from .pruning import TokenPruning
from .relaxed import SoftSelect, SoftTopK

__all__ = ["TopK", "TokenPruning", "SoftTopK", "SoftSelect"]
