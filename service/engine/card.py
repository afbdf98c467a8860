"""The model card: what /v1/models shows about a loaded model, as plain JSON-ready data.

Per layer: geometry, fused epilogue, sparsity, the backend each loaded backend gave it, and,
when `auto` measured them, its time on each backend per batch bucket and the sparse speedup.
"""

from __future__ import annotations

from typing import Any

from service.engine.assemble import BuiltModel
from service.engine.build import PreparedModel

CARD_VERSION = 1


def _summary(choice: dict[int, str]) -> str:
    kinds = set(choice.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _round(x: float, digits: int = 9) -> float:
    return float(f"{x:.{digits}g}")


def _merged_timings(builts: dict[str, BuiltModel]) -> dict[str, dict[int, dict]]:
    merged: dict[str, dict[int, dict]] = {}
    for built in builts.values():
        for name, per_bucket in built.timings.items():
            merged.setdefault(name, {}).update(per_bucket)
    return merged


def layer_sparsity(prepared: PreparedModel) -> dict[str, float]:
    """layer -> fraction of zero weights, for escort_layer_sparsity: convs, then linears."""
    out = {name: round(layer.sparsity, 6) for name, layer in prepared.layers.items()}
    out.update({name: round(s, 6) for name, s in prepared.linear_sparsity.items()})
    return out


def model_card(
    name: str,
    architecture: str,
    prepared: PreparedModel,
    builts: dict[str, BuiltModel],
    *,
    device: str,
    precision: str,
    source: str = "",
) -> dict[str, Any]:
    timings = _merged_timings(builts)
    layers: list[dict[str, Any]] = []
    totals = {"weights": 0, "nonzeros": 0, "macs": 0, "sparse_macs": 0}
    conv_time: dict[str, dict[str, float]] = {}
    for lname, layer in prepared.layers.items():
        g = layer.geometry
        nnz = layer.nnz
        entry: dict[str, Any] = {
            "name": lname,
            "kind": "conv",
            "in_channels": g.in_channels,
            "out_channels": g.out_channels,
            "kernel": list(g.kernel),
            "stride": list(g.stride),
            "padding": list(g.padding),  # left, right, top, bottom
            "dilation": list(g.dilation),
            "groups": g.groups,
            "input": [g.in_channels, *g.in_hw],
            "output": [g.out_channels, *g.out_hw],
            "epilogue": g.epilogue,
            "weights": layer.weight.numel(),
            "nonzeros": nnz,
            "sparsity": round(layer.sparsity, 6),
            "macs": g.macs_per_image,
            "backend": {
                b: _summary(built.choices.get(lname, {0: b})) for b, built in builts.items()
            },
        }
        totals["weights"] += layer.weight.numel()
        totals["nonzeros"] += nnz
        totals["macs"] += g.macs_per_image
        totals["sparse_macs"] += round(g.macs_per_image * nnz / max(1, layer.weight.numel()))
        if "auto" in builts and lname in builts["auto"].choices:
            choice = builts["auto"].choices[lname]
            entry["auto_choice"] = {str(b): c for b, c in choice.items()}
        per_bucket = timings.get(lname)
        if per_bucket:
            entry["time_s"] = {
                kind: {str(b): _round(t[kind]) for b, t in per_bucket.items()}
                for kind in ("dense", "sparse")
            }
            entry["speedup"] = {
                str(b): round(t["dense"] / t["sparse"], 3) if t["sparse"] > 0 else None
                for b, t in per_bucket.items()
            }
            for b, t in per_bucket.items():
                sums = conv_time.setdefault(str(b), {"dense": 0.0, "sparse": 0.0, "auto": 0.0})
                sums["dense"] += t["dense"]
                sums["sparse"] += t["sparse"]
                sums["auto"] += min(t["dense"], t["sparse"])
        layers.append(entry)
    for lname, sparsity in prepared.linear_sparsity.items():
        entry = {"name": lname, "kind": "linear", "sparsity": round(sparsity, 6)}
        entry["backend"] = {b: "torch" for b in builts}
        layers.append(entry)

    notes: list[str] = []
    for built in builts.values():
        notes += [n for n in built.notes if n not in notes]
    weights = max(1, totals["weights"])
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "model": name,
        "architecture": architecture,
        "source": source,
        "device": device,
        "precision": precision,
        "backends": list(builts),
        "input": list(prepared.input_shape),
        "fused": prepared.traced,
        "conv_layers": len(prepared.layers),
        "conv_weights": totals["weights"],
        "conv_nonzeros": totals["nonzeros"],
        "conv_sparsity": round(1 - totals["nonzeros"] / weights, 6),
        "conv_macs_dense": totals["macs"],
        "conv_macs_nonzero": totals["sparse_macs"],
        "notes": notes,
        "layers": layers,
    }
    if conv_time:
        # Sum of per-layer conv times at each bucket: what auto's choices save, layer by layer.
        card["conv_time_s"] = {
            b: {k: _round(v) for k, v in sums.items()} for b, sums in conv_time.items()
        }
        card["speedup"] = {
            b: {
                "sparse_vs_dense": round(s["dense"] / s["sparse"], 3),
                "auto_vs_dense": round(s["dense"] / s["auto"], 3),
            }
            for b, s in conv_time.items()
            if s["sparse"] > 0 and s["auto"] > 0
        }
    return card
