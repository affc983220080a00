"""Exported models: a TorchScript module that carries its own metadata.

The file is a TorchScript archive (``torch.jit.save``) with ``dmn_meta.json``
as an extra file: image size, metric scale, architecture config and a
fingerprint of the weights. Maps and shared contexts store the fingerprint, so
embeddings from another model are rejected instead of silently misread.
TorchScript archives are loaded by TorchScript's own loader, which restores
tensors and compiled TorchScript code only: no arbitrary Python classes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmn_ros.errors import ModelLoadError
from dmn_ros.files import atomic_write_bytes  # also imported from here by the nodes and the trainer
from dmn_ros.geometry import MetricScale
from dmn_ros.model import MODEL_KINDS, model_config, model_kind
from dmn_ros.model.kinds import constructor_args

META_FILE = "dmn_meta.json"
FORMAT = "dmn_ros.model/1"
DEFAULT_MODEL_NAME = "dmn_maze32.pt"
REQUIRED_METHODS = ("embed_views", "prepare_map", "prepare_query", "log_likelihood_prepared")
"""What a particle-filter observation model (``dmn``, ``latent_image``, ``latent_vector``) exports."""
REGRESSION_METHODS = ("embed_views", "prepare_map", "prepare_query", "regress_prepared")
"""What the ``regression`` baseline exports instead (no particle weights)."""

_log = logging.getLogger("dmn_ros.export")


def resolve_device(name: str | torch.device | None, *, fallback: bool = True) -> torch.device:
    """``"auto"`` → cuda when available, else cpu; ``"cuda"`` without a GPU falls back to cpu (warned), or
    raises ``ValueError`` when ``fallback`` is False. An unknown name raises ``ValueError``."""
    text = str(name or "auto").lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda") and not torch.cuda.is_available():
        if not fallback:
            raise ValueError(f"device {text!r} requested but CUDA is not available (use cpu or auto)")
        _log.warning("device %r requested but CUDA is not available; using cpu", text)
        return torch.device("cpu")
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {text!r} (use auto, cpu or cuda): {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    """What a consumer of an exported model must know besides the weights."""

    image_height: int
    image_width: int
    meters_per_unit: float
    """Meters per normalized unit of the training data (20 m for the 40 m worlds)."""
    fingerprint: str
    """sha256 of the weights (hex, 16 chars); maps and contexts carry it."""
    config: dict[str, Any] = field(default_factory=dict)
    embed_shape: tuple[int, int, int] = (64, 8, 8)
    """``(D, h, w)`` of one view embedding."""
    area_size_m: float = 40.0
    """Side of the square area the model was trained in; tools warn far outside it."""
    description: str = ""
    format: str = FORMAT

    def metric_scale(self, origin_x: float = 0.0, origin_y: float = 0.0) -> MetricScale:
        return MetricScale(self.meters_per_unit, origin_x, origin_y)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Stable over save/load and devices: hashes names, shapes and float32 bytes of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    meters_per_unit: float,
    area_size_m: float = 40.0,
    description: str = "",
    calibration: dict[str, float] | None = None,
    results: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> ModelInfo:
    """Script ``model`` (any kind in :data:`dmn_ros.model.MODEL_KINDS`) and save it with its metadata, atomically.

    ``calibration`` (e.g. ``{"covariance_inflation": s}``, fitted on validation runs) is
    stored in ``config["calibration"]``, where the Localizer reads it. ``results`` (JSON values:
    the figures the model reached and how they were measured, see :func:`results_from_eval`) is
    stored in ``config["results"]`` so a model file says what it is good for. ``training`` (the
    training data's domain, source and camera: :func:`training_data_summary`) goes into
    ``config["training"]``: a model says which kind of world it was trained for.
    The caller's ``model`` is left as it was (device, train/eval mode): a CPU copy is exported.
    """
    model = copy.deepcopy(model).to("cpu").eval()
    config: dict[str, Any] = model_config(model)  # includes "kind": load_model checks the methods it needs
    if calibration:
        config["calibration"] = {k: float(v) for k, v in calibration.items()}
    if results:
        config["results"] = json.loads(json.dumps(results))  # plain JSON values only, checked here
    if training:
        config["training"] = json.loads(json.dumps(training))
    info = ModelInfo(
        image_height=model.image_height,
        image_width=model.image_width,
        meters_per_unit=float(meters_per_unit),
        fingerprint=weights_fingerprint(model),
        config=config,
        embed_shape=(model.embed_dim, model.feat_h, model.feat_w),
        area_size_m=float(area_size_m),
        description=description,
    )
    write_model_file(torch.jit.script(model), asdict(info), path)
    return info


def write_model_file(module: torch.jit.ScriptModule, meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The file format's writer: ``module`` as a TorchScript archive with ``meta`` (JSON) as its
    :data:`META_FILE`, written atomically. Nothing is checked or re-hashed (:func:`export_model` builds
    ``meta`` from the model; :func:`load_model` checks a file against its module)."""
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={META_FILE: json.dumps(meta)})
    atomic_write_bytes(path, buf.getvalue())


def read_model_file(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, str]:
    """The file format's reader: the TorchScript module and the raw :data:`META_FILE` text ("" when the
    archive has none), unchecked; torch's own errors propagate (:func:`load_model` turns them into
    :class:`ModelLoadError`)."""
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    return module, extra[META_FILE]


@dataclass
class LoadedModel:
    """A loaded observation model (TorchScript) plus its metadata, on one device."""

    module: torch.jit.ScriptModule
    info: ModelInfo
    device: torch.device
    """The device :func:`load_model` put the module on; :func:`module_device` says where it is now."""
    path: str


def module_device(module: Any, default: torch.device | str = "cpu") -> torch.device:
    """Where ``module``'s weights are (its first parameter or buffer); ``default`` for a module without any,
    or for an object that only has the observation-model methods (a wrapper, not a ``torch.nn.Module``)."""
    if isinstance(module, torch.nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device(default)


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model; every failure is a :class:`ModelLoadError` naming the file.

    ``device`` is ``auto`` (cuda when available), ``cpu``, ``cuda`` (an error without CUDA) or a torch device.
    """
    path = Path(path)
    try:
        dev = resolve_device(device, fallback=False)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        module, meta_text = read_model_file(path, dev)
    except Exception as exc:  # torch raises RuntimeError/ValueError/zip errors for damaged archives
        raise ModelLoadError(f"cannot load model {path}: not a readable TorchScript archive ({exc})") from exc
    if not meta_text:
        raise ModelLoadError(f"model {path} has no {META_FILE}: not a dmn_ros export")
    try:
        raw = json.loads(meta_text)
        raw["embed_shape"] = tuple(raw["embed_shape"])
        info = ModelInfo(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"model {path} has malformed metadata: {exc}") from exc
    if info.format != FORMAT:
        raise ModelLoadError(f"model {path} has format {info.format!r}, expected {FORMAT!r}")
    try:
        kind = model_kind(info.config)
    except ValueError as exc:
        raise ModelLoadError(f"model {path}: {exc}") from exc
    required = REGRESSION_METHODS if kind == "regression" else REQUIRED_METHODS
    missing = [m for m in required if not hasattr(module, m)]
    if missing:
        raise ModelLoadError(f"model {path} lacks methods {missing}: a different architecture")
    if not isinstance(info.image_height, int) or not isinstance(info.image_width, int) or not (
        isinstance(info.meters_per_unit, (int, float)) and info.meters_per_unit > 0
    ):
        raise ModelLoadError(f"model {path} has invalid metadata (image size / meters_per_unit): {raw}")
    actual = weights_fingerprint(module)
    if actual != info.fingerprint:
        # Maps are checked against this fingerprint, so it must describe these very weights.
        raise ModelLoadError(f"model {path}: weights fingerprint {actual} does not match its metadata "
                             f"({info.fingerprint}); the file was altered or assembled from parts")
    # The fingerprint covers the weights only: the metadata that says how to use them must match the module too.
    mismatch = _metadata_mismatch(module, info, kind, dev)
    if mismatch:
        raise ModelLoadError(f"model {path}: {mismatch}; the metadata does not describe its TorchScript module "
                             "(edited, or written by another tool)")
    module.eval()
    return LoadedModel(module=module, info=info, device=dev, path=str(path))


def _module_kind(module: torch.jit.ScriptModule) -> str | None:
    """The kind a scripted module is: its ``kind`` constant, else the kind whose class it was scripted from
    (``original_name``); None for a class not in :data:`MODEL_KINDS` (e.g. a subclass), which is not checked."""
    kind = getattr(module, "kind", None)
    if isinstance(kind, str):
        return kind
    name = getattr(module, "original_name", None)
    return next((k for k, cls in MODEL_KINDS.items() if cls.__name__ == name), None)


def _differs(meta_value: Any, module_value: Any) -> bool:
    return meta_value != module_value or isinstance(meta_value, bool) != isinstance(module_value, bool)


def _metadata_mismatch(module: torch.jit.ScriptModule, info: ModelInfo, kind: str, device: torch.device) -> str:
    """The first metadata field that disagrees with what ``module`` itself exposes, as
    ``metadata FIELD is X but the module has Y``; "" when all agree.

    Compared: the kind (the module's ``kind`` constant or scripted class), the image size, every architecture
    key of ``config`` the module keeps as a scripted constant (``attention``, ``egocentric``, ``vector_dim``, ...)
    and ``embed_shape``: the module's ``(embed_dim, feat_h, feat_w)``, or where it lacks those, the shape
    ``embed_views`` gives one zero image (the only case that runs the network).
    """
    actual_kind = _module_kind(module)
    if actual_kind is not None and actual_kind != kind:
        return (f"metadata field 'kind' is {kind!r} but the module is a {module.original_name} "
                f"(kind {actual_kind!r})")
    for field_name in ("image_height", "image_width"):
        meta_value, actual = getattr(info, field_name), getattr(module, field_name, None)
        if actual is not None and _differs(meta_value, actual):
            return f"metadata field {field_name!r} is {meta_value!r} but the module has {actual!r}"
    for key in sorted(constructor_args(kind) & set(info.config)):
        actual = getattr(module, key, None)
        if actual is not None and _differs(info.config[key], actual):
            return f"metadata field 'config.{key}' is {info.config[key]!r} but the module has {actual!r}"
    shape_attrs = [getattr(module, a, None) for a in ("embed_dim", "feat_h", "feat_w")]
    if all(isinstance(v, int) for v in shape_attrs):
        actual_shape: tuple[int, ...] = tuple(shape_attrs)
    else:
        height = getattr(module, "image_height", info.image_height)
        width = getattr(module, "image_width", info.image_width)
        try:
            with torch.no_grad():
                actual_shape = tuple(module.embed_views(torch.zeros(1, 3, height, width, device=device)).shape[1:])
        except Exception as exc:  # a TorchScript runtime error: the module cannot embed images of this size
            return f"the module's embed_views fails on a {height}x{width} zero image ({exc})"
    if _differs(tuple(info.embed_shape), actual_shape):
        return (f"metadata field 'embed_shape' is {list(info.embed_shape)} but the module embeds a view as "
                f"{list(actual_shape)}")
    return ""


def package_share_file(*parts: str) -> Path:
    """A data file the package installs (``models/...``, ``config/...``), the first that exists of: the ament share
    directory (colcon), ``<sys.prefix>/share/dmn_ros`` (``pip install .``), the source tree (``pip install -e .``);
    else the source tree's path."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("dmn_ros")).joinpath(*parts))
    except Exception:  # ament index absent (plain pip install) or package not in it
        pass
    candidates.append(Path(sys.prefix, "share", "dmn_ros", *parts))
    candidates.append(Path(__file__).resolve().parent.parent.joinpath(*parts))
    return next((c for c in candidates if c.is_file()), candidates[-1])


def default_model_path() -> Path:
    """The shipped model: ``$DMN_ROS_MODEL``, else :func:`package_share_file` ``models/dmn_maze32.pt``."""
    env = os.environ.get("DMN_ROS_MODEL")
    if env:
        return Path(env)
    return package_share_file("models", DEFAULT_MODEL_NAME)


def training_data_summary(meta: Any, dataset: str) -> dict[str, Any]:
    """What a model file records of its training data (``meta``: the dataset's ``DatasetMeta``)."""
    return {"domain": str(meta.domain), "source": str(meta.source), "camera": str(meta.camera),
            "fov_deg": None if meta.fov_deg is None else float(meta.fov_deg),
            "image_size": [int(v) for v in meta.image_size], "bounds_m": [float(v) for v in meta.bounds],
            "dataset": str(dataset)}


def training_domain(info: ModelInfo) -> str:
    """The training data's domain (``maze``, ``rooms``, a user label), or "" for models that predate it."""
    training = info.config.get("training")
    return str(training.get("domain", "")) if isinstance(training, dict) else ""


def results_from_eval(results_json: dict[str, Any]) -> dict[str, Any]:
    """The headline of a ``dmn-eval`` ``results.json`` for :func:`export_model`'s ``results``.

    Global success at t = 1 and t = 5 (or the last step), tracking RMSE at t = 5, and the episode
    set they were measured on.
    """
    def at(curve: list[float], t: int) -> float:
        return float(curve[min(t, len(curve)) - 1])

    g, r = results_json["global_success"], results_json["tracking_rmse_m"]
    g = g[0] if g and isinstance(g[0], list) else g
    r = r[0] if r and isinstance(r[0], list) else r
    return {
        "global_success_t1": at(g, 1),
        "global_success_t5": at(g, 5),
        "tracking_rmse_m_t5": at(r, 5),
        "success_threshold_m": float(results_json["threshold_m"]),
        "episode_set": results_json.get("episode_set", {}),
    }
