"""Thin ``torch.nn`` modules over khot's functions: they hold arguments, nothing else."""

from .exact import TopK
from .pruning import TokenPruning
from .relaxed import SoftSelect, SoftTopK
from .routing import RouterOutput, TopKRouter
from .sae import BatchTopK, TopKActivation
from .selection import FeatureSelector

__all__ = ["TopK", "TokenPruning", "SoftTopK", "SoftSelect", "TopKRouter", "RouterOutput", "TopKActivation", "BatchTopK", "FeatureSelector"]
