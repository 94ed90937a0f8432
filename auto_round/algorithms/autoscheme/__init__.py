"""AutoScheme: mixed-precision allocation under a bit budget (layer sensitivity scores + exact knapsack).

    spec.py    the user-facing AutoScheme settings and option parsing
    cost.py    bits a layer costs under a scheme (weights + scales + zero points)
    groups.py  layers that must share one option (fused q/k/v, gate/up, MoE experts, shared_layers)
    solver.py  exact dynamic-programming knapsack over items
The scoring (a forward/backward over the model) lives in model/autoscheme_score.py, the glue in
model/autoscheme_plan.py.
"""

from .cost import layer_bits, n_groups
from .groups import build_groups
from .solver import Item, Solution, solve
from .spec import AutoScheme, AutoSchemeError

__all__ = ["AutoScheme", "AutoSchemeError", "Item", "Solution", "build_groups", "layer_bits", "n_groups", "solve"]
