"""Training: recipes, the loop, checkpoints and resume, torchrun support; ``load_run`` rebuilds a trained model."""

from deploykit.train.checkpoint import load_run
from deploykit.train.recipe import Recipe, load_recipe
from deploykit.train.run import train

__all__ = ["Recipe", "load_recipe", "load_run", "train"]
