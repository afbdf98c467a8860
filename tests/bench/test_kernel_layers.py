"""The layer benchmark's CPU side: arguments, the suite, summaries and the written report."""

from __future__ import annotations

import json

import pytest
import torch

from bench.kernels import layers as bench
from bench.kernels.methods import BASELINES, magnitude_prune
from bench.kernels.report import summarize, write_report


def test_suite_is_the_anchor_suite() -> None:
    assert len(bench.SUITE) == 18
    by_name = {layer.name: layer for layer in bench.SUITE}
    assert by_name["resnet50.l2.3x3s2"].output_hw() == 28
    assert by_name["resnet50.conv1"].output_hw() == 112
    assert by_name["alexnet.conv2"].output_hw() == 27


def test_arguments_and_layer_selection() -> None:
    args = bench.parse_args(["--sparsity", "0.9", "--batch", "1,16", "--layers", "resnet50.l4"])
    assert args.sparsity == [0.9] and args.batch == [1, 16]
    assert [layer.name for layer in bench.select_layers(args.layers)] == [
        "resnet50.l4.3x3",
        "resnet50.l4.1x1up",
    ]
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "cudnn_fp32"])
    with pytest.raises(SystemExit):
        bench.select_layers("lenet")
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_magnitude_pruning_keeps_the_largest() -> None:
    w = torch.arange(1.0, 101.0).reshape(4, 25, 1, 1) * torch.tensor([1.0, -1.0]).repeat(50).view(
        4, 25, 1, 1
    )
    pruned = magnitude_prune(w, 0.9)
    assert int((pruned != 0).sum()) == 10
    assert set(pruned[pruned != 0].abs().tolist()) == set(range(91, 101))


def _fake_records() -> list[dict]:
    records = []
    for layer, escort_ms in (("a", 0.01), ("b", 0.04)):
        records.append(
            {
                "layer": layer,
                "batch": 1,
                "sparsity": 0.9,
                "mode": "eager",
                "method": "escort",
                "ms": escort_ms,
                "useful_flop": 2e9,
                "nnz": 10,
            }
        )
        for method in BASELINES:
            sparse_dependent = method in ("escort_port", "im2col_cusparse")
            records.append(
                {
                    "layer": layer,
                    "batch": 1,
                    "sparsity": 0.9 if sparse_dependent else None,
                    "mode": "eager",
                    "method": method,
                    "ms": escort_ms * 4,
                }
            )
    records.append(
        {
            "layer": "b",
            "batch": 1,
            "sparsity": None,
            "mode": "eager",
            "method": "cudnn_fp16",
            "ms": None,
            "error": "boom",
        }
    )
    return records


def test_summary_and_report(tmp_path) -> None:
    records = [
        r
        for r in _fake_records()
        if not (r["layer"] == "b" and r["ms"] and r["method"] == "cudnn_fp16")
    ]
    summary = summarize(records, sgemm_tflops=50.0)
    assert len(summary) == 1
    row = summary[0]
    assert row["ratios"]["im2col_cublas"] == pytest.approx(4.0)
    assert row["ratios"]["cudnn_fp16"] == pytest.approx(4.0)  # only layer a measured it
    assert row["escort_tflops"] == pytest.approx((200.0 * 50.0) ** 0.5)
    meta = {
        "device": "Test GPU",
        "date": "2026-01-01",
        "torch": "x",
        "cupy": "y",
        "sgemm_tflops": 50.0,
        "args": {"reps": 3, "warmup": 1},
    }
    paths = write_report(tmp_path / "r-layers", meta, records, [], summary, plots=True)
    names = sorted(p.name for p in paths)
    assert names == [
        "r-layers-sparsity.png",
        "r-layers-speedup.png",
        "r-layers.json",
        "r-layers.md",
    ]
    text = (tmp_path / "r-layers.md").read_text()
    assert "vs im2col+cuSPARSE" in text and "boom" in text
    assert json.loads((tmp_path / "r-layers.json").read_text())["summary"][0]["layers"] == 2


def test_the_fp16_kernel_is_summarized_on_its_own_rows(tmp_path) -> None:
    records = [r for r in _fake_records() if r.get("ms")]
    for r in [r for r in records if r["method"] == "escort"]:
        records.append({**r, "method": "escort_fp16", "ms": r["ms"] / 2})
    summary = summarize(records, sgemm_tflops=50.0)
    assert [s["kernel"] for s in summary] == ["escort", "escort_fp16"]
    fp32, fp16 = summary
    assert fp16["ratios"]["im2col_cublas"] == pytest.approx(2 * fp32["ratios"]["im2col_cublas"])
    assert fp16["escort_tflops"] == pytest.approx(2 * fp32["escort_tflops"])
    text = "\n".join(bench.summary_lines(summary, 50.0))
    assert "| Escort fp16 (ours) | 0.90 | 1 | eager |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_main_without_gpu_explains(capsys) -> None:
    assert bench.main(["--layers", "resnet50.l4.3x3"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
