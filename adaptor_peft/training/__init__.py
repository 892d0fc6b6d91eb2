"""Training: recipes (YAML data over defaults, with overrides) and the accelerate loop that runs them."""

from .loop import TrainingError, build_model, evaluate, evaluate_run, train
from .metrics import ClassificationMetrics
from .recipe import RecipeError, list_recipes, load_recipe, recipes_dir

__all__ = [
    "ClassificationMetrics",
    "RecipeError",
    "TrainingError",
    "build_model",
    "evaluate",
    "evaluate_run",
    "list_recipes",
    "load_recipe",
    "recipes_dir",
    "train",
]
