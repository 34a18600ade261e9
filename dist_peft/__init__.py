"""dist_peft — distributed parameter-efficient fine-tuning (LoRA, LoCA, FO-LoRA, FRoD, OD-LoRA, ScaLoRA).

Layers (see DESIGN.md): ``methods`` hold the math of one adapter on one linear site and never import an
engine; ``parallel`` says how a site is split (``ShardSpec``) and traces every collective; ``integrations``
attach adapters to an engine's linears; ``train`` runs a YAML-configured job.
"""

__version__ = "0.1.0"
