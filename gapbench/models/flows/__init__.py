"""Flow posterior families: the auxiliary-variable flow ("flow") and RealNVP ("realnvp").

Importing this package registers both in :data:`gapbench.models.posterior.FAMILIES`.
"""

from gapbench.models.flows.auxiliary import AuxiliaryFlow
from gapbench.models.flows.base import FlowFamily
from gapbench.models.flows.layers import ConditionerNet, batched_linear, soft_clamp
from gapbench.models.flows.realnvp import RealNVP
from gapbench.models.flows.transforms import AffineCoupling, CompositeTransform, Transform
from gapbench.models.posterior import FAMILIES

FAMILIES.setdefault(AuxiliaryFlow.name, AuxiliaryFlow)
FAMILIES.setdefault(RealNVP.name, RealNVP)

__all__ = [
    "AffineCoupling",
    "AuxiliaryFlow",
    "CompositeTransform",
    "ConditionerNet",
    "FlowFamily",
    "RealNVP",
    "Transform",
    "batched_linear",
    "soft_clamp",
]
