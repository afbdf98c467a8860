"""`escort fetch-models`: make sure every configured model's weights are present and load.

Container builds run it so that a missing weights package or checkpoint fails the build, not the
first start. It reads ESCORT_MODELS and ESCORT_MODELS_DIR (or --models / --models-dir), loads and
prunes each model on the CPU and prints its size and sparsity. Exit status 1 names the model that
failed and why.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="escort fetch-models", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--models", default=os.environ.get("ESCORT_MODELS", "efficientnet-lite0"))
    parser.add_argument(
        "--models-dir",
        default=os.environ.get("ESCORT_MODELS_DIR", ""),
        help="comma list of folders searched before the shipped manifests",
    )
    args = parser.parse_args(argv)

    from service.engine.loader import load_pruned_model
    from service.engine.manifest import load_manifest

    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            manifest = load_manifest(name, args.models_dir)
            model = load_pruned_model(manifest)
        except Exception as exc:  # report which model failed, then stop the build
            print(f"escort fetch-models: {name}: {exc}", file=sys.stderr)
            return 1
        total = zeros = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 4:
                total += weight.numel()
                zeros += int((weight == 0).sum())
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.1f}M parameters, conv sparsity {zeros / max(total, 1):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
