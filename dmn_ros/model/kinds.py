"""Model kinds selectable with ``model.kind`` (training config) and stored in every checkpoint and export.

``dmn`` is the paper's method; ``latent_image``, ``latent_vector`` and ``regression`` are
its baselines (SPEC "Baselines"). Ablations stay DMN flags (``attention``, ``egocentric``).
The kind lives in the model's config so export/load and checkpoints rebuild the right
class; a config without one (older DMN checkpoints and exports) means ``dmn``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from dmn_ros.model.dmn import DMN
from dmn_ros.model.latent_map import LatentImageMap, LatentVectorMap
from dmn_ros.model.regression import PoseRegression

MODEL_KINDS: dict[str, type[nn.Module]] = {
    "dmn": DMN,
    "latent_image": LatentImageMap,
    "latent_vector": LatentVectorMap,
    "regression": PoseRegression,
}
PARTICLE_FILTER_KINDS = ("dmn", "latent_image", "latent_vector")
"""Kinds with the observation-model interface the filter, Localizer and nodes use."""


def model_kind(config: Mapping[str, Any]) -> str:
    """The kind named by a config (``dmn`` when absent); unknown kinds raise ``ValueError``."""
    kind = str(config.get("kind", "dmn"))
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return kind


def constructor_args(kind: str) -> set[str]:
    """Keyword arguments of the kind's constructor (architecture keys a config may carry)."""
    return set(inspect.signature(MODEL_KINDS[kind].__init__).parameters) - {"self"}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """A fresh model of ``config["kind"]`` with the config's other keys as constructor arguments."""
    kind = model_kind(config)
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    unknown = set(kwargs) - constructor_args(kind)
    if unknown:
        raise ValueError(f"model kind {kind!r} does not take {sorted(unknown)}")
    return MODEL_KINDS[kind](**kwargs)


def model_config(model: nn.Module) -> dict[str, Any]:
    """``model.config()`` with its ``kind`` (the DMN's own config predates kinds and lacks it)."""
    config = dict(model.config())  # type: ignore[operator]
    config.setdefault("kind", str(getattr(model, "kind", "dmn")))
    return config
