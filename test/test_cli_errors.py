"""Console tools on bad input: arguments are checked before any long work, and mistakes are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmn_ros.errors import ModelLoadError
from dmn_ros.model import DMN, model_config


def _checkpoint(path: Path) -> Path:
    """A dmn-train checkpoint of an untrained DMN, without training."""
    from dmn_ros.training.trainer import save_checkpoint

    torch.manual_seed(0)
    model = DMN()
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model_config(model), "step": 0,
                           "meters_per_unit": 20.0, "area_size_m": 40.0})
    return path


def _never(*_args, **_kwargs):
    raise AssertionError("the long work started before the arguments were checked")


def test_eval_loads_the_baseline_model_before_evaluating(untrained, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import dmn_ros.evaluation.cli as eval_cli

    monkeypatch.setattr(eval_cli, "make_episode_set", _never)
    with pytest.raises(ModelLoadError, match=r"typo\.pt"):
        eval_cli.main(["--model", untrained.path, "--baseline-model", str(tmp_path / "typo.pt"),
                       "--data", str(tmp_path), "--out", str(tmp_path / "out")])


def test_export_reads_results_before_calibrating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dmn_ros.training.export_cli as export_cli

    monkeypatch.setattr(export_cli, "calibrate", _never)
    ckpt = _checkpoint(tmp_path / "checkpoint_best.pt")
    args = [str(ckpt), str(tmp_path / "m.pt"), "--calibrate", str(tmp_path), "--results"]
    with pytest.raises(FileNotFoundError):
        export_cli.main([*args, str(tmp_path / "typo.json")])
    (tmp_path / "bad.json").write_text('{"fingerprints": []}')
    with pytest.raises(SystemExit):  # figures of other weights: argparse's error
        export_cli.main([*args, str(tmp_path / "bad.json")])
    assert not (tmp_path / "m.pt").exists()
