"""Training stages (objectives), one module each, registered once by name: `stage: sft | dpo`."""

from rayft.objectives.base import Objective, general_objective, get_objective, register, stage_names

# Importing the modules registers their stages.
from rayft.objectives import dpo, sft  # noqa: E402,F401

__all__ = ["Objective", "general_objective", "get_objective", "register", "stage_names"]
