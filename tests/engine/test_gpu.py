"""On the GPU: the Escort kernel inside the engine agrees with cuDNN for every shipped model,
at batch 1, 7 (padded to bucket 8) and 32, with and without CUDA graphs.

Run there with `PYTHONPATH=. python3 -m pytest tests/engine -m gpu -q`.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from service.engine.assemble import build_backend
from service.engine.autotune import TuningCache
from service.engine.backends import SparseConv
from service.engine.build import PreparedModel, prepare_model
from service.engine.engine import ModelSource, TorchEngine, load_source
from service.engine.protocol import EngineSpec
from service.engine.runner import Runner
from tests.engine.conftest import PHOTOS, load_photos

pytestmark = pytest.mark.gpu

MODELS_DIR = "models"
SHIPPED = (
    "efficientnet-lite0",
    "resnet50-skimcaffe",
    "resnet50-uniform90",
    "alexnet-deepcompression",
    "vgg16-deepcompression",
)
BATCHES = (1, 7, 32)
BUCKETS = (1, 8, 32)


@functools.cache
def _model(name: str) -> tuple[ModelSource, PreparedModel]:
    source = load_source(name, MODELS_DIR)
    crop = source.preprocessing.crop
    return source, prepare_model(source.module, (3, crop, crop))


@functools.cache
def _images(name: str, n: int) -> np.ndarray:
    """Real photos and simple variations of them (flips, shifts, contrast): realistic inputs
    with well-separated top-5s, as many as needed."""
    base = load_photos(_model(name)[0].preprocessing, PHOTOS)
    out = []
    for i in range(n):
        img = base[i % len(base)]
        k = i // len(base)
        if k % 2:
            img = img[:, :, ::-1]
        img = np.roll(img, shift=3 * (k // 2), axis=2) * (1.0 - 0.05 * (k % 3))
        out.append(img)
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def _runner(built, prepared, graphs: bool) -> Runner:
    runner = Runner(
        built,
        model_name="m",
        input_shape=prepared.input_shape,
        max_batch_size=max(BUCKETS),
        buckets=BUCKETS,
        cuda_graphs=graphs,
        probabilities=False,
    )
    runner.warm()
    return runner


def _check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert np.isfinite(got).all(), what
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-3, f"{what}: max |logit diff| {diff:.2e}"
    top_got = np.argsort(-got, axis=1)[:, :5]
    top_want = np.argsort(-want, axis=1)[:, :5]
    assert (top_got == top_want).all(), f"{what}: top-5 differs"


@pytest.mark.parametrize("name", SHIPPED)
def test_sparse_matches_dense_at_batches_with_and_without_graphs(name: str) -> None:
    source, prepared = _model(name)
    cuda = torch.device("cuda")
    images = _images(name, max(BATCHES))
    dense = build_backend(prepared, "dense", cuda, "fp32")
    sparse = build_backend(prepared, "sparse", cuda, "fp32", buckets=BUCKETS, tune_kernel=False)
    assert all(c == {0: "sparse"} for c in sparse.choices.values())
    reference = _runner(dense, prepared, graphs=False)
    for graphs in (True, False):
        runner = _runner(sparse, prepared, graphs)
        assert runner.graph_buckets == (BUCKETS if graphs else ())
        for n in BATCHES:
            want = reference.infer(images[:n])
            _check(runner.infer(images[:n]), want, f"{name} b{n} graphs={graphs}")
        runner.close()
    # cuDNN itself agrees with the CPU model it came from.
    with torch.inference_mode():
        cpu = source.module(torch.from_numpy(images[:2])).numpy()
    np.testing.assert_allclose(reference.infer(images[:2]), cpu, rtol=1e-3, atol=1e-3)
    reference.close()


def test_bucket_padding_ignores_stale_rows() -> None:
    _, prepared = _model("resnet50-uniform90")
    cuda = torch.device("cuda")
    sparse = build_backend(prepared, "sparse", cuda, "fp32", buckets=BUCKETS, tune_kernel=False)
    runner = _runner(sparse, prepared, graphs=True)
    eager = _runner(sparse, prepared, graphs=False)
    images = _images("resnet50-uniform90", 8)
    noise = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32) * 5
    runner.infer(noise)  # leaves big values in the bucket-8 input rows
    for n in (2, 3, 5, 7):
        got = runner.infer(images[:n])
        assert got.shape[0] == n
        # The bucket runs other kernel configs than the exact batch, so float sums differ in
        # order (seen: 1.5e-5 on logits near 50); stale rows would be off by far more.
        np.testing.assert_allclose(got, eager.infer(images[:n]), rtol=1e-5, atol=1e-4)


def test_engine_on_cuda_auto_sparse_dense_profiling_and_card(tmp_path) -> None:
    source, _ = _model("resnet50-uniform90")
    calls: list[tuple] = []
    spec = EngineSpec(
        models=(source.name,),
        backends=("auto", "sparse", "dense"),
        device="cuda",
        precision="fp32",
        max_batch_size=8,
        layer_profile_every=2,
        cache_dir=str(tmp_path),
    )
    engine = TorchEngine(spec, [source], layer_observer=lambda *a: calls.append(a), progress=False)
    try:
        images = _images(source.name, 8)
        probs = {b: engine.infer(source.name, b, images[:5]) for b in spec.backends}
        for backend in ("auto", "sparse"):
            np.testing.assert_allclose(probs[backend], probs["dense"], atol=1e-4)
        np.testing.assert_allclose(probs["dense"].sum(1), 1.0, rtol=1e-4)
        assert calls == []  # first batch: not sampled
        engine.infer(source.name, "auto", images[:3])
        assert {c[5] for c in calls} == {4}  # three rows ran in bucket 4
        layers = {c[2] for c in calls}
        assert "layer1.0.conv2" in layers and "fc" in layers
        assert all(c[4] > 0 for c in calls)
        assert {c[3] for c in calls} & {"conv_sparse", "conv_dense"}
        card = engine.describe()[source.name].card
        conv = next(layer for layer in card["layers"] if layer["name"] == "layer3.0.conv2")
        assert set(conv["time_s"]) == {"dense", "sparse"} and "8" in conv["time_s"]["sparse"]
        assert (tmp_path / "autotune.json").exists()
        print("\nresnet50-uniform90 conv speedups by bucket:", card.get("speedup"))
    finally:
        engine.close()


def test_engine_gathers_prefetched_arena_rows_from_its_device_mirror(tmp_path) -> None:
    """pin_host_memory gives the arena a device mirror, prefetch_rows fills it, and a batch of
    those rows reads them there: rows changed on the host after their push (which the engine
    process never does) still answer as pushed, and once taken they cross from the host."""
    import mmap

    source, _ = _model("resnet50-uniform90")
    spec = EngineSpec(models=(source.name,), backends=("dense",), device="cuda",
                      precision="fp32", max_batch_size=8, cache_dir=str(tmp_path))  # fmt: skip
    engine = TorchEngine(spec, [source], progress=False)
    images = _images(source.name, 8)
    want_a = engine.infer(source.name, "dense", images[:4])
    other = images[4:][::-1].copy()  # other photos in every row, not flips of the same
    want_b = engine.infer(source.name, "dense", other)
    memory = mmap.mmap(-1, images[:4].nbytes)  # page-aligned, as an arena is
    arena = np.frombuffer(memory, dtype=np.float32).reshape(images[:4].shape)
    rows = [arena[i] for i in range(4)]
    try:
        assert engine.pin_host_memory(arena.ctypes.data, arena.nbytes)
        arena[...] = images[:4]
        engine.prefetch_rows(rows)
        torch.cuda.synchronize()  # the pushes read the rows before they change
        arena[...] = other
        _check(engine.infer_rows(source.name, "dense", rows), want_a, "gathered from the mirror")
        _check(engine.infer_rows(source.name, "dense", rows), want_b, "copied from the host")
        engine.prefetch_rows(rows)
        _check(engine.infer_rows(source.name, "dense", rows), want_b, "pushed as they are")
        engine.unpin_host_memory(arena.ctypes.data)
    finally:
        del rows, arena
        engine.close()


def test_half_precision_and_tf32_stay_close(tmp_path) -> None:
    _, prepared = _model("resnet50-skimcaffe")
    cuda = torch.device("cuda")
    images = _images("resnet50-skimcaffe", 8)
    ref = _runner(build_backend(prepared, "dense", cuda, "fp32"), prepared, True).infer(images)
    for backend, precision in (("dense", "fp16"), ("sparse", "fp16"), ("dense", "tf32")):
        built = build_backend(
            prepared, backend, cuda, precision, buckets=BUCKETS, tune_kernel=False
        )
        got = _runner(built, prepared, True).infer(images)
        assert np.isfinite(got).all(), (backend, precision)
        # Rounding moves logits a little; the prediction as a whole must stay the same.
        for row_got, row_ref in zip(got, ref, strict=True):
            assert np.corrcoef(row_got, row_ref)[0, 1] > 0.99, (backend, precision)
        if backend == "sparse":
            # Every layer (7x7 stem included) runs the fp16 kernel, in NCHW, with no casts.
            assert any("fp16 Escort kernel" in note for note in built.notes), built.notes
            assert not built.channels_last
            ops = [m for m in built.module.modules() if isinstance(m, SparseConv)]
            assert ops and all(op.runs_natively(torch.float16) for op in ops)


@pytest.mark.parametrize("lowering", ["im2col-cublas", "im2col-cusparse"])
def test_lowering_baselines_are_exact(lowering: str) -> None:
    _, prepared = _model("resnet50-skimcaffe")
    cuda = torch.device("cuda")
    images = _images("resnet50-skimcaffe", 7)
    dense = _runner(build_backend(prepared, "dense", cuda, "fp32"), prepared, False)
    lowered = _runner(build_backend(prepared, lowering, cuda, "fp32"), prepared, True)
    _check(lowered.infer(images), dense.infer(images), lowering)


def test_real_timer_and_cache_on_gpu(tmp_path) -> None:
    _, prepared = _model("alexnet-deepcompression")
    cuda = torch.device("cuda")
    cache = TuningCache(tmp_path / "autotune.json")
    built = build_backend(prepared, "auto", cuda, "fp32", buckets=(1, 8), cache=cache)
    for timings in built.timings.values():
        for entry in timings.values():
            assert 0 < entry["dense"] < 1 and 0 < entry["sparse"] < 1
    again = build_backend(
        prepared,
        "auto",
        cuda,
        "fp32",
        buckets=(1, 8),
        cache=TuningCache(tmp_path / "autotune.json"),
        timer=lambda *a: pytest.fail("the cache should have answered"),
    )
    assert again.choices == built.choices
