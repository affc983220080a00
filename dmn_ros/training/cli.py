"""``dmn-train``: train a DMN from a YAML config plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import logging

import torch

from dmn_ros.errors import console_main
from dmn_ros.training.config import load_config
from dmn_ros.training.trainer import train


@console_main("dmn-train")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="YAML file (see config/train_dmn.yaml)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: an earlier run's checkpoint_last.pt and checkpoint_best.pt in out are set "
                        "aside as checkpoint_*.earlier-<time>.pt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. lr=3e-4 max_steps=2000 model.attention=false")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    path = train(cfg, resume=not args.no_resume)
    print(f"exported model: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
