"""The four distillation recipes of SPEC section 4, each a `Recipe`: its networks, its task loss
and its distillation loss written against the public kdkernels API (so `backend=` switches every
distillation op of a run between the fused kernels and the eager reference)."""

from __future__ import annotations

from models.recipes.base import Recipe, Sizes
from models.recipes.cpkd import CPKD
from models.recipes.hlfd import HLFD
from models.recipes.kdas import KDAS
from models.recipes.ltg import LTG

RECIPES: dict[str, type[Recipe]] = {"kdas": KDAS, "hlfd": HLFD, "cpkd": CPKD, "ltg": LTG}

__all__ = ["RECIPES", "Recipe", "Sizes"]
