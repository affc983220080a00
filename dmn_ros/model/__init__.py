"""Networks of the Differentiable Mapping Network (SPEC "Networks", "Egocentric spatial attention") and baselines."""

from dmn_ros.model.dmn import DMN
from dmn_ros.model.kinds import MODEL_KINDS, PARTICLE_FILTER_KINDS, build_model, model_config, model_kind
from dmn_ros.model.latent_map import LatentImageMap, LatentVectorMap
from dmn_ros.model.regression import PoseRegression, regress_sequence

__all__ = [
    "DMN",
    "MODEL_KINDS",
    "PARTICLE_FILTER_KINDS",
    "LatentImageMap",
    "LatentVectorMap",
    "PoseRegression",
    "build_model",
    "model_config",
    "model_kind",
    "regress_sequence",
]
