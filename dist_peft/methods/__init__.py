"""One module per method: the math of one adapter on one linear site, parallel-agnostic."""

from dist_peft.methods import lora  # noqa: F401  (registers "lora")
from dist_peft.methods.base import Adapter, Controller, ParamLayout, Site, StepContext, get_method, register_method

__all__ = ["Adapter", "Controller", "ParamLayout", "Site", "StepContext", "get_method", "register_method"]
