"""The kernel-variant registry: each variant registered once, found from its configs, in the
compiled module's source list, in the tuning cache's kernel version; the default policy and
the tuner's candidates loop over it (no GPU)."""

from __future__ import annotations

import dataclasses

import pytest

from service.kernels import variants
from service.kernels.configs import candidate_configs, default_config
from service.kernels.direct import DIRECT, DirectConfig, direct_candidates
from service.kernels.stretched_csr import make_geometry
from service.kernels.tiled import TILED
from service.kernels.tiling import TileConfig
from service.kernels.tiling import candidate_configs as tiled_candidates


def test_each_variant_is_registered_once_and_owns_its_config_type() -> None:
    names = [v.name for v in variants.VARIANTS]
    assert names == ["tiled", "direct", "tiled-half", "direct-half"] and len(set(names)) == len(
        names
    )
    assert len({v.config_type for v in variants.VARIANTS}) == len(names)
    assert variants.variant_for(DirectConfig(2, 8, 2)) is DIRECT
    assert variants.variant_for(default_config(_geometry(56), 16, 0.1)) is TILED
    with pytest.raises(TypeError, match="no registered kernel variant"):
        variants.variant_for(("not", "a", "config"))
    # Every variant's kernels are compiled from its own source, and the paper's port, which
    # only the benchmark runs, is in none of them.
    for variant in variants.VARIANTS:
        assert variant.kernel_names
        for name in variant.kernel_names:
            assert name.partition("<")[0] in "".join(variant.sources)
        assert "sconv_shm_port" not in "".join(variant.sources)


def test_kernel_version_follows_the_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    version = variants.KERNEL_VERSION
    assert len(version) == 12 and version == variants._version()
    changed = dataclasses.make_dataclass("Changed", [])()
    for attr in ("name", "dtype", "sources", "params_dtype", "kernel_names"):
        setattr(changed, attr, getattr(DIRECT, attr))
    changed.sources = (DIRECT.sources[0] + "\n// one more line\n",)
    monkeypatch.setattr(variants, "VARIANTS", (TILED, changed, *variants.VARIANTS[2:]))
    assert variants._version() != version


def _geometry(hw: int, channels: int = 256, kernel: int = 3):
    return make_geometry((channels, channels, kernel, kernel), (hw, hw), 1, kernel // 2, 1, 1)


@pytest.mark.parametrize(("hw", "batch"), [(7, 1), (14, 1), (56, 16), (28, 4)])
def test_candidates_start_with_each_variant_s_guess_and_take_the_rest_in_turn(
    hw: int, batch: int
) -> None:
    geometry = _geometry(hw)
    configs = candidate_configs(geometry, batch, 0.1)
    default = default_config(geometry, batch, 0.1)
    tiled = tiled_candidates(geometry, batch, 0.1)
    direct = direct_candidates(geometry, batch, 0.1)
    other = tiled[0] if isinstance(default, DirectConfig) else direct[0]
    assert configs[:2] == [default, other]
    assert set(configs) == set(tiled) | set(direct) and len(configs) == len(set(configs))
    # Under the tuner's limit both variants keep their nearest neighbours.
    limited = candidate_configs(geometry, batch, 0.1, limit=12)
    assert sum(isinstance(c, DirectConfig) for c in limited) == min(len(direct), 6)
    assert sum(isinstance(c, TileConfig) for c in limited) == 12 - min(len(direct), 6)


def test_the_lowest_rank_wins_and_ties_go_to_registry_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    geometry = _geometry(56)
    assert isinstance(default_config(geometry, 16, 0.1), TileConfig)  # tiled ranks 0 here
    # Rank the direct kernel first: it becomes the default (its own guess).
    monkeypatch.setattr(DIRECT, "default_config", lambda g, b, d: (DirectConfig(1, 8, 1), -1))
    assert default_config(geometry, 16, 0.1) == DirectConfig(1, 8, 1)


def test_the_serving_process_imports_no_benchmark() -> None:
    """The layer benchmark and the paper's port live in bench/, outside the serving path."""
    import subprocess
    import sys

    code = (
        "import sys, service.app, service.engine.engine, service.kernels.plan; "
        "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
