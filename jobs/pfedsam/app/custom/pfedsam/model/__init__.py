"""Model layer: backbones, LoRA, L-MoE, the PFedSAM wrapper and the parameter registry."""

from .backbones import BackboneError, build_backbone, sam_backbone_registry
from .lmoe import BottleneckExpert, LocalizedMoE
from .lora import LoRALinear
from .pfedsam import PFedSAM, build_pfedsam
from .registry import (
    ParameterRegistry,
    ParamKind,
    RegistryError,
    check_state,
    global_state,
    load_global_state,
    load_local_state,
    local_state,
)

__all__ = [
    "BackboneError", "BottleneckExpert", "LoRALinear", "LocalizedMoE", "PFedSAM", "ParamKind",
    "ParameterRegistry", "RegistryError", "build_backbone", "build_pfedsam", "check_state",
    "global_state", "load_global_state", "load_local_state", "local_state", "sam_backbone_registry",
]
