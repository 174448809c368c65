"""The weights-and-KV planner (issue 18): from a model's config, budgets and bandwidths, where each layer lives,
how the GPU budget splits, and the predicted ms/token. Config only; `tierkv plan` prints it.
"""

from tierkv.plan.bandwidth import Bandwidths, default_bandwidths, load_bandwidths
from tierkv.plan.inputs import PlanInputs
from tierkv.plan.planner import make_plan, spread
from tierkv.plan.result import Plan, PlanDoesNotFitError

__all__ = ["Bandwidths", "Plan", "PlanDoesNotFitError", "PlanInputs", "default_bandwidths", "load_bandwidths",
           "make_plan", "spread"]
