"""Every model in ``models/`` loads, carries both calibrations and its figures, and docs/RESULTS.md quotes them."""

from pathlib import Path

import pytest

from dmn_ros.export import load_model, training_domain
from dmn_ros.localizer import INDEPENDENT_FRAMES_SUFFIX, Localizer, LocalizerConfig

ROOT = Path(__file__).resolve().parent.parent
MODELS = sorted((ROOT / "models").glob("*.pt"))


def test_the_default_model_ships() -> None:
    assert (ROOT / "models" / "dmn_maze32.pt") in MODELS


@pytest.mark.parametrize("path", MODELS, ids=[p.name for p in MODELS])
def test_shipped_model_metadata_matches_results_page(path: Path) -> None:
    model = load_model(path)
    cal = model.info.config["calibration"]
    for key in ("likelihood_scale", "covariance_inflation"):
        assert cal[key] > 0 and cal[key + INDEPENDENT_FRAMES_SUFFIX] > 0, key
    # The node's Localizer runs the robot-stream temperature, not the independent-views one.
    assert Localizer(model, config=LocalizerConfig(device="cpu")).likelihood_scale == cal["likelihood_scale"]
    # The domain it was trained for is recorded, and the results were measured in that domain.
    assert training_domain(model.info) in path.stem, (training_domain(model.info), path.name)
    res = model.info.config["results"]
    # The training data's test split, or (rooms) test rooms regenerated after a world fix, of the same domain.
    assert res["episode_set"].get("domain", training_domain(model.info)) == model.info.config["training"]["domain"]
    assert Path(res["episode_set"]["data"]).name.startswith(Path(model.info.config["training"]["dataset"]).name)
    assert res["episode_set"]["query_mode"] == "random_order" and res["episode_set"]["split"] == "test"
    assert 0.0 <= res["global_success_t1"] <= 1.0 and 0.0 <= res["global_success_t5"] <= 1.0
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    assert model.info.fingerprint in page, f"docs/RESULTS.md does not name {path.name}'s weights"
    row = next((line for line in page.splitlines() if line.startswith("| DMN, `" + path.name)), None)
    assert row is not None, f"no headline row for {path.name} in docs/RESULTS.md"
    cells = [c.strip().strip("*") for c in row.split("|")[2:-1]]
    assert cells[0] == f"{100 * res['global_success_t1']:.1f}" and cells[1] == f"{100 * res['global_success_t5']:.1f}"
    assert cells[3] == f"{res['tracking_rmse_m_t5']:.2f}"
