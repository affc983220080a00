"""Model files whose metadata does not describe their module, and results that are not one model's own.

The weights fingerprint covers the weights only; ``load_model`` must also refuse metadata (image size,
kind, architecture flags, embedding shape) that disagrees with the TorchScript module, and ``dmn-export
--results`` must refuse figures that ``dmn-eval`` averaged over several models.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from dmn_ros.errors import ModelLoadError
from dmn_ros.export import ModelInfo, export_model, load_model, read_model_file, weights_fingerprint, write_model_file
from dmn_ros.model import DMN, LatentVectorMap, model_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real export of an untrained DMN and of a small latent-vector baseline."""
    out = tmp_path_factory.mktemp("export_checks")
    torch.manual_seed(0)
    export_model(DMN(), out / "dmn.pt", meters_per_unit=20.0)
    export_model(LatentVectorMap(vector_dim=16), out / "vec.pt", meters_per_unit=20.0)
    return {"dmn": out / "dmn.pt", "vec": out / "vec.pt"}


def _rewrite(src: Path, dst: Path, top: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Path:
    """``src`` with its metadata edited, written by the file format's own writer (the weights and their
    fingerprint untouched)."""
    module, text = read_model_file(src)
    meta = json.loads(text)
    meta.update(top or {})
    meta["config"].update(config or {})
    write_model_file(module, meta, dst)
    return dst


def test_only_the_unedited_copies_load(exported: dict[str, Path], tmp_path: Path) -> None:
    """The rewriter alone changes nothing that load_model checks; the same edit to the image size then does."""
    for name, src in exported.items():
        info = load_model(src).info
        same = load_model(_rewrite(src, tmp_path / f"{name}_same.pt")).info
        assert same == info and info.embed_shape == (64, 8, 8)
        edited = _rewrite(src, tmp_path / f"{name}_64.pt", {"image_height": 64, "image_width": 64},
                          {"image_height": 64, "image_width": 64})
        with pytest.raises(ModelLoadError, match=f"{name}_64.pt.*'image_height' is 64 but the module has 32"):
            load_model(edited)


EDITS = {
    "image size 64x64 (top level only)": ({"image_height": 64, "image_width": 64}, {}, "'image_height' is 64"),
    "image size 64x64 (everywhere)": ({"image_height": 64, "image_width": 64},
                                      {"image_height": 64, "image_width": 64}, "'image_height' is 64"),
    "width only": ({"image_width": 48}, {}, "'image_width' is 48"),
    "config image size only": ({}, {"image_height": 64}, "'config.image_height' is 64"),
    "attention off": ({}, {"attention": False}, "'config.attention' is False but the module has True"),
    "egocentric off": ({}, {"egocentric": False}, "'config.egocentric' is False but the module has True"),
    "other kind": ({}, {"kind": "latent_vector"}, "'kind' is 'latent_vector' but the module is a DMN"),
    "other embed shape": ({"embed_shape": [64, 16, 16]}, {}, r"'embed_shape' is \[64, 16, 16\] but the module "
                                                             r"embeds a view as \[64, 8, 8\]"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_dmn_metadata_that_disagrees_with_the_module_is_refused(exported: dict[str, Path], tmp_path: Path,
                                                                edit: str) -> None:
    top, config, message = EDITS[edit]
    path = _rewrite(exported["dmn"], tmp_path / "edited.pt", top, config)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(path)
    assert "edited.pt" in str(err.value)


@pytest.mark.parametrize(("config", "message"), [
    ({"vector_dim": 128}, "'config.vector_dim' is 128 but the module has 16"),
    ({"kind": "dmn"}, "'kind' is 'dmn' but the module is a LatentVectorMap"),
    ({"kind": "latent_image"}, "'kind' is 'latent_image' but the module is a LatentVectorMap"),
])
def test_baseline_metadata_that_disagrees_with_the_module_is_refused(exported: dict[str, Path], tmp_path: Path,
                                                                     config: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(_rewrite(exported["vec"], tmp_path / "edited.pt", config=config))


class _Bare(torch.nn.Module):
    """An observation model that keeps no size constants: only a forward of ``embed_views`` tells its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)

    @torch.jit.export
    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    @torch.jit.export
    def prepare_map(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embeddings, embeddings

    @torch.jit.export
    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return query, query

    @torch.jit.export
    def log_likelihood_prepared(self, map_a: torch.Tensor, map_g: torch.Tensor, context_poses: torch.Tensor,
                                q: torch.Tensor, hq: torch.Tensor, particles: torch.Tensor,
                                nearest: int = 0) -> torch.Tensor:
        return particles.sum(dim=2)


def test_embed_shape_of_a_module_without_size_constants_is_checked_by_a_forward(tmp_path: Path) -> None:
    module = torch.jit.script(_Bare().eval())
    info = ModelInfo(image_height=32, image_width=32, meters_per_unit=20.0, fingerprint=weights_fingerprint(module),
                     config={"kind": "dmn"}, embed_shape=(4, 8, 8))
    write_model_file(module, asdict(info), tmp_path / "bare.pt")
    assert load_model(tmp_path / "bare.pt").info.embed_shape == (4, 8, 8)
    write_model_file(module, {**asdict(info), "embed_shape": [64, 8, 8]}, tmp_path / "bare_wrong.pt")
    with pytest.raises(ModelLoadError, match=r"'embed_shape' is \[64, 8, 8\] but the module embeds a view as "
                                             r"\[4, 8, 8\]"):
        load_model(tmp_path / "bare_wrong.pt")
    write_model_file(module, {**asdict(info), "image_height": 64, "image_width": 64}, tmp_path / "bare_64.pt")
    with pytest.raises(ModelLoadError, match=r"'embed_shape' is \[4, 8, 8\] but the module embeds a view as "
                                             r"\[4, 16, 16\]"):
        load_model(tmp_path / "bare_64.pt")


# ---- dmn-export --results -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A dmn-train checkpoint of an untrained DMN (no training) and its weights fingerprint."""
    from dmn_ros.training.trainer import save_checkpoint

    torch.manual_seed(0)
    model = DMN()
    path = tmp_path_factory.mktemp("export_cli") / "checkpoint_best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model_config(model), "step": 0,
                           "meters_per_unit": 20.0, "area_size_m": 40.0})
    return path, weights_fingerprint(model)


def _eval_results(fingerprints: list[str]) -> dict[str, Any]:
    """A results.json as dmn-eval writes it: one ``models`` / ``fingerprints`` entry per ``--model``, the
    curves averaged over them."""
    return {"models": [f"seed{i}.pt" for i in range(len(fingerprints))], "method": "DMN",
            "fingerprints": fingerprints, "episodes": 4, "cluster_radius_m": 2.0, "threshold_m": 8.94,
            "global_success": [0.25, 0.5, 0.5, 0.5, 0.75], "tracking_rmse_m": [3.0, 2.0, 2.0, 2.0, 1.5],
            "episode_set": {"split": "test", "episodes": 4}}


def test_export_refuses_results_averaged_over_several_models(checkpoint: tuple[Path, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from dmn_ros.training.export_cli import main as export

    ckpt, fp = checkpoint
    (tmp_path / "seeds.json").write_text(json.dumps(_eval_results([fp, "0123456789abcdef"])))
    assert export([str(ckpt), str(tmp_path / "m.pt"), "--results", str(tmp_path / "seeds.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmn-export: error: --results ") and "seeds.json" in err
    assert "averaged over 2 models" in err and fp in err and "0123456789abcdef" in err
    assert "evaluate this model alone" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()
    # The same figures measured on this model alone are accepted and stored.
    (tmp_path / "alone.json").write_text(json.dumps(_eval_results([fp])))
    assert export([str(ckpt), str(tmp_path / "m.pt"), "--results", str(tmp_path / "alone.json")]) == 0
    info = load_model(tmp_path / "m.pt").info
    assert info.fingerprint == fp and info.config["results"]["global_success_t5"] == 0.75
