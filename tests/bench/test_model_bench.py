"""The model bench runs end to end on CPU with a tiny model and writes its three files."""

from __future__ import annotations

import json

import torch
import torchvision

from bench.model import report as bench_report
from bench.model import run as bench
from service.engine.engine import ModelSource
from tests.engine.conftest import magnitude_prune, randomize_batchnorm
from tests.engine.test_engine import LABELS, PREP


def test_bench_rows_targets_and_files(tmp_path, plan_factory) -> None:
    model = magnitude_prune(randomize_batchnorm(torchvision.models.resnet18().eval()), 0.9)
    source = ModelSource("resnet50-uniform90", "resnet18", model, PREP, LABELS)
    rows = bench.run_bench(
        [source],
        ("sparse-fp32", "dense-fp32", "auto-fp32", "im2col-cusparse", "dense-fp16"),
        (2, 1),
        torch.device("cpu"),
        reps=3,
        budget_s=0.5,
        plan_factory=plan_factory,
        progress=False,
    )
    assert [(r["config"], r["batch"]) for r in rows][:2] == [("dense-fp32", 1), ("dense-fp32", 2)]
    assert len(rows) == 10 and all("error" not in r for r in rows)
    for row in rows:
        assert row["device_s"] > 0 and row["e2e_s"] > 0 and row["graph"] is False
        if row["config"] != "dense-fp32":
            assert row["max_abs_diff"] < 1e-3 and row["top5_match"], row
    checks = {(t["target"], t["batch"]) for t in bench_report.targets(rows)}
    assert ("b1 latency (ms)", 1) in checks
    assert ("auto fp32 / best single (<= 1.03)", 2) in checks

    payload = {"environment": bench.environment(torch.device("cpu")), "results": rows}
    payload["targets"] = bench_report.targets(rows)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload, default=str))
    assert bench.main(["--replot", str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    assert "## resnet50-uniform90" in md and "| auto-fp32 | 2 |" in md
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "resnet50-uniform90" in bench_report.summary_table(rows)


def test_bench_cli_rejects_unknown_configs(capsys) -> None:
    try:
        bench.parse_args(["--configs", "dense-fp32,cudnn-int4"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "cudnn-int4" in capsys.readouterr().err
    args = bench.parse_args(["--quick"])
    assert args.models == ("resnet50-uniform90",) and args.batches == (1, 8)


def test_the_cpu_refuses_the_gpu_sweep_and_gpu_configs(capsys) -> None:
    assert bench.main(["--device", "cpu", "--models", "resnet50-uniform90"]) == 2
    err = capsys.readouterr().err
    assert "default configs are for GPUs" in err and "dense-fp32, sparse-fp32, auto-fp32" in err
    assert (
        bench.main(["--device", "cpu", "--configs", "dense-fp32,dense-tf32,im2col-cusparse"]) == 2
    )
    err = capsys.readouterr().err
    assert "dense-tf32, im2col-cusparse need a CUDA GPU" in err
    assert bench.cpu_refusal(("dense-fp32", "sparse-fp32"), given=True) is None
