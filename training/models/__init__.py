"""Models, one module per family, and the registry that finds them.

``sets`` (pfn, dnn, cone_cut), ``lorentz`` (the dimuon networks), ``image`` (image_fcn,
cnn); :mod:`~bsym.training.models.base` holds what they share.
"""

from bsym.training.models.base import (
    BsymModel,
    ModelSettings,
    NetworkModel,
    Standardise,
    mlp,
    model_inputs,
)
from bsym.training.models.registry import build_model, model_from_kwargs, model_types
from bsym.training.models.sets import DNN, PFN, ConeCut

__all__ = [
    "DNN",
    "PFN",
    "BsymModel",
    "ConeCut",
    "ModelSettings",
    "NetworkModel",
    "Standardise",
    "build_model",
    "mlp",
    "model_from_kwargs",
    "model_inputs",
    "model_types",
]
