"""Console tools on bad input: arguments are checked before any long work, and mistakes are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def test_eval_loads_the_baseline_model_before_evaluating(untrained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import dmn_ros.evaluation.cli as eval_cli

    monkeypatch.setattr(eval_cli, "make_episode_set", _never)
    assert eval_cli.main(["--model", untrained.path, "--baseline-model", str(tmp_path / "typo.pt"),
                          "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "typo.pt" in capsys.readouterr().err


def test_export_reads_results_before_calibrating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dmn_ros.training.export_cli as export_cli

    monkeypatch.setattr(export_cli, "calibrate", _never)
    ckpt = _checkpoint(tmp_path / "checkpoint_best.pt")
    args = [str(ckpt), str(tmp_path / "m.pt"), "--calibrate", str(tmp_path), "--results"]
    assert export_cli.main([*args, str(tmp_path / "typo.json")]) == 2
    (tmp_path / "bad.json").write_text('{"fingerprints": []}')
    with pytest.raises(SystemExit):  # figures of other weights: argparse's error
        export_cli.main([*args, str(tmp_path / "bad.json")])
    assert not (tmp_path / "m.pt").exists()


def _mains() -> dict[str, object]:
    from dmn_ros.bags.evaluate import main as bag_eval
    from dmn_ros.bags.record import main as bag_record
    from dmn_ros.data.cli import main as dataset
    from dmn_ros.demo import main as demo
    from dmn_ros.evaluation.cli import main as evaluate
    from dmn_ros.training.cli import main as train
    from dmn_ros.training.export_cli import main as export

    return {"dmn-train": train, "dmn-eval": evaluate, "dmn-export": export, "dmn-bag-record": bag_record,
            "dmn-bag-eval": bag_eval, "dmn-demo": demo, "dmn-dataset": dataset}


MISTAKES = [  # (tool, arguments with {tmp} for a fresh directory, words the message must contain)
    ("dmn-train", ["--config", "{tmp}/missing.yaml"], "missing.yaml"),
    ("dmn-train", ["out={tmp}/run", "learning_rate=1"], "unknown config keys"),
    ("dmn-train", ["out={tmp}/run", "lr"], "key=value"),
    ("dmn-train", ["out={tmp}/run", "curriculum=[{until_step: 5, contexts: 3}]"], "contexts"),
    ("dmn-train", ["out={tmp}/run", "curriculum=[{until_step: 5"], "not valid YAML"),
    ("dmn-train", ["out={tmp}/run"], "data= is required"),
    ("dmn-train", ["out={tmp}/run", "data={tmp}/no_such"], "no_such"),
    ("dmn-eval", ["--model", "{tmp}/missing.pt", "--data", "{tmp}"], "missing.pt"),
    ("dmn-eval", ["--model", "{model}", "--data", "{tmp}/no_such"], "no_such"),
    ("dmn-export", ["{tmp}/missing.pt", "{tmp}/out.pt"], "missing.pt"),
    ("dmn-export", ["{model}", "{tmp}/out.pt"], "pass checkpoint_best.pt or checkpoint_last.pt"),
    ("dmn-export", ["{tmp}/junk.pt", "{tmp}/out.pt"], "not a dmn-train checkpoint"),
    ("dmn-bag-record", ["{tmp}"], "already exists"),
    ("dmn-bag-eval", ["{tmp}/run.mcap", "--model", "{tmp}/missing.pt", "--out", "{tmp}/o"], "missing.pt"),
    ("dmn-demo", ["--params-file", "{tmp}/missing.yaml"], "missing.yaml"),
    ("dmn-dataset", ["check", "{tmp}/no_such"], "no_such"),
]


@pytest.mark.parametrize(("tool", "argv", "words"), MISTAKES, ids=[f"{t}:{' '.join(a)}" for t, a, _ in MISTAKES])
def test_common_mistakes_are_one_line_errors(tool: str, argv: list[str], words: str, untrained, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "run.mcap").write_bytes(b"")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", untrained.path) for a in argv]
    assert _mains()[tool](args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{tool}: error: ") and "\n" not in err and words in err, err
    assert "weights_only=False" not in err  # never torch's advice to unpickle an untrusted file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_train_on_cuda_without_cuda_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _mains()["dmn-train"]([f"out={tmp_path}/run", f"data={tmp_path}", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmn-train: error: ") and "CUDA" in err and "\n" not in err


def test_bad_argument_values_get_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _mains()["dmn-bag-eval"](["bag", "--success-steps", "a"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--success-steps" in err and "Traceback" not in err
