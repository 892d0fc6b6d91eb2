"""Training: recipes (YAML data over defaults, with overrides), what they build (:mod:`.build`), the run
folders they fill (:mod:`.runs`) and the accelerate loop that runs them (:mod:`.loop`)."""

from .build import build_model
from .loop import evaluate, evaluate_run, train
from .metrics import ClassificationMetrics
from .recipe import RecipeError, list_recipes, load_recipe, recipes_dir
from .runs import TrainingError

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
