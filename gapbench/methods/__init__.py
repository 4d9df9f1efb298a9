"""Training methods (``train.method``): how a VAE's encoder and decoder are updated, one module each.

Every method is a :class:`~gapbench.methods.base.Method`; :func:`get_method` finds one by name.
The modules are imported on demand, so a method's dependencies load only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from gapbench.methods.base import Method, NonFiniteLoss, StepResult, decoder_parameters, encoder_parameters

#: name -> (module, class). The order is the README's.
METHODS: Dict[str, Tuple[str, str]] = {
    "vae": ("gapbench.methods.vae", "VAE"),
    "iwae": ("gapbench.methods.vae", "IWAE"),
    "svi": ("gapbench.methods.svi", "SVI"),
    "savae": ("gapbench.methods.savae", "SAVAE"),
    "iterative": ("gapbench.methods.iterative", "Iterative"),
    "aggressive": ("gapbench.methods.aggressive", "Aggressive"),
    "hmc": ("gapbench.methods.hmc", "HMC"),
    "air": ("gapbench.methods.air", "AIR"),
    "bsvi": ("gapbench.methods.bsvi", "BSVI"),
}


def get_method(name: str) -> type:
    try:
        module, cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; choose one of {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(module), cls)


def method_name(train_cfg) -> str:
    """The method a train section asks for; ``objective: iwae`` of a plain VAE (recipes of before
    train.method) is method iwae."""
    if train_cfg.method == "vae" and train_cfg.objective == "iwae":
        return "iwae"
    return train_cfg.method


def method_settings(train_cfg):
    """The recipe's section for the chosen method (``train.<method>``), or None when it has none."""
    return getattr(train_cfg, method_name(train_cfg), None)


def build_method(model, train_cfg) -> Method:
    """The method of ``train_cfg`` over ``model`` (built with :func:`prepare_model` applied)."""
    return get_method(method_name(train_cfg))(model, train_cfg, method_settings(train_cfg))


def prepare_model(model, train_cfg):
    """``model`` with what its training method adds to it (see Method.prepare_model); returns it."""
    get_method(method_name(train_cfg)).prepare_model(model, method_settings(train_cfg))
    return model


__all__ = ["METHODS", "Method", "NonFiniteLoss", "StepResult", "build_method", "decoder_parameters",
           "encoder_parameters", "get_method", "method_name", "method_settings", "prepare_model"]
