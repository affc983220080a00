"""``dmn-export``: turn a training checkpoint into the TorchScript model the nodes and tools load."""

from __future__ import annotations

import argparse

from dmn_ros.export import export_model
from dmn_ros.training.trainer import load_checkpoint, model_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="checkpoint_best.pt or checkpoint_last.pt from dmn-train")
    p.add_argument("out", help="output model file, e.g. models/my_site.pt")
    p.add_argument("--description", default="", help="free text stored in the model's metadata")
    args = p.parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state)
    desc = args.description or f"exported from {args.checkpoint} (step {state['step']})"
    info = export_model(model, args.out, meters_per_unit=float(state["meters_per_unit"]),
                        area_size_m=float(state["area_size_m"]), description=desc)
    print(f"wrote {args.out}: {info.image_height}x{info.image_width}, {info.meters_per_unit} m/unit, "
          f"fingerprint {info.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
