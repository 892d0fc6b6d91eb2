"""Training: recipes (YAML data over defaults, with overrides)."""

from .recipe import RecipeError, list_recipes, load_recipe, recipes_dir

__all__ = ["RecipeError", "list_recipes", "load_recipe", "recipes_dir"]
