"""One module per method: the math of one adapter on one linear site, parallel-agnostic."""

from dist_peft.methods import folora  # noqa: F401  (registers "folora")
from dist_peft.methods import frod  # noqa: F401  (registers "frod")
from dist_peft.methods import loca  # noqa: F401  (registers "loca")
from dist_peft.methods import lora  # noqa: F401  (registers "lora")
from dist_peft.methods import odlora  # noqa: F401  (registers "odlora")
from dist_peft.methods import scalora  # noqa: F401  (registers "scalora")
from dist_peft.methods.base import Adapter, Controller, ParamLayout, Site, StepContext, get_method, register_method

__all__ = ["Adapter", "Controller", "ParamLayout", "Site", "StepContext", "get_method", "register_method"]
