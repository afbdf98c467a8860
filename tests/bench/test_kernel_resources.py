"""Every registered kernel compiles with NVRTC on this host (no GPU needed), and its ptxas
resources are read back: the CPU-side check that a kernel source change still builds."""

from __future__ import annotations

import json

import pytest

from bench.kernels import resources
from service.kernels.variants import VARIANTS

try:
    resources._nvrtc()
    NVRTC = None
except resources.CompileError as exc:  # pragma: no cover - wheels without NVRTC
    NVRTC = str(exc)

needs_nvrtc = pytest.mark.skipif(NVRTC is not None, reason=f"no NVRTC here: {NVRTC}")


@pytest.fixture(scope="module")
def measured() -> list[resources.Resources]:
    return resources.measure("sm_90")


@needs_nvrtc
def test_every_registered_instantiation_compiles_for_hopper(measured) -> None:
    names = [name for variant in VARIANTS for name in variant.kernel_names]
    assert [r.kernel for r in measured] == names
    for r in measured:
        assert 16 <= r.registers <= 255, r  # ptxas read, not defaulted
        # Real spills in a kernel's loop cost local-memory traffic per nonzero; small ones in
        # a prologue are tolerable, a kilobyte is a regression.
        assert r.spill_stores + r.spill_loads < 256, r


@needs_nvrtc
def test_a_source_nvrtc_rejects_fails_with_its_log() -> None:
    broken = "__global__ void k(float* x) { x[0] = undefined_name; }"
    with pytest.raises(resources.CompileError, match="undefined_name"):
        resources.compile_log(broken, ["k"], "sm_90")


def test_the_ptxas_log_is_parsed_per_entry() -> None:
    log = "\n".join(
        [
            "ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90'",
            "ptxas info    : Function properties for _Z1aPf",
            "ptxas         .     16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads",
            "ptxas info    : Used 64 registers, used 1 barriers, 8192 bytes smem",
            "ptxas info    : Compiling entry function '_Z1bPf' for 'sm_90'",
            "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
            "ptxas info    : Used 45 registers, used 1 barriers",
        ]
    )
    assert resources.parse_log(log) == {
        "_Z1aPf": {
            "stack": 16,
            "spill_stores": 12,
            "spill_loads": 8,
            "registers": 64,
            "static_shared": 8192,
        },
        "_Z1bPf": {
            "stack": 0,
            "spill_stores": 0,
            "spill_loads": 0,
            "registers": 45,
            "static_shared": 0,
        },
    }


@needs_nvrtc
def test_the_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    assert resources.main(["--arch", "sm_90", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "resources-sm_90.json").read_text())
    assert data["arch"] == "sm_90"
    assert {k["variant"] for k in data["kernels"]} == {v.name for v in VARIANTS}
    table = (tmp_path / "resources-sm_90.md").read_text()
    assert "`escort_direct<2>`" in table and table in capsys.readouterr().out
