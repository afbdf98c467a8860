"""TorchEngine end to end on CPU: numpy in, probabilities out, cards, errors, profiling."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import torchvision

from service.engine import load_engine
from service.engine.engine import ModelSource, TorchEngine, available_models
from service.engine.errors import BadBatchError, UnknownBackendError, UnknownModelError
from service.engine.protocol import EngineSpec, Preprocessing
from tests.engine.conftest import magnitude_prune, randomize_batchnorm

PREP = Preprocessing(resize=73, crop=64, mean=(120.0, 115.0, 100.0), std=(60.0, 60.0, 60.0))
LABELS = tuple(f"class {i}" for i in range(1000))


def _source(name: str = "tiny-resnet", arch: str = "resnet18") -> ModelSource:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    model = magnitude_prune(randomize_batchnorm(model), 0.85)
    return ModelSource(name, arch, model, PREP, LABELS, source="test")


def _engine(tmp_path, backends=("sparse", "dense"), plan_factory=None, observer=None, **spec_kw):
    spec = EngineSpec(
        models=("tiny-resnet",),
        backends=backends,
        device="cpu",
        max_batch_size=spec_kw.pop("max_batch_size", 8),
        cache_dir=str(tmp_path / "cache"),
        **spec_kw,
    )
    return TorchEngine(
        spec, [_source()], layer_observer=observer, progress=False, plan_factory=plan_factory
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.engine.conftest import StandInPlan, real_plan_factory

    tmp = tmp_path_factory.mktemp("engine")
    eng = _engine(tmp, ("sparse", "dense", "auto"), real_plan_factory() or StandInPlan)
    yield eng
    eng.close()


def test_probabilities_match_the_original_model(engine) -> None:
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    source = _source()
    with torch.no_grad():
        want = torch.softmax(source.module(torch.from_numpy(batch)), 1).numpy()
    for backend in ("dense", "sparse", "auto"):
        probs = engine.infer("tiny-resnet", backend, batch)
        assert probs.dtype == np.float32 and probs.shape == (3, 1000)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(probs, want, atol=1e-5)
    half = engine.infer("tiny-resnet", "dense", batch.astype(np.float16))
    np.testing.assert_allclose(half, want, atol=1e-2)
    readonly = batch.copy()
    readonly.flags.writeable = False
    np.testing.assert_allclose(engine.infer("tiny-resnet", "sparse", readonly), want, atol=1e-5)


def test_describe_carries_card_and_sparsity(engine) -> None:
    desc = engine.describe()["tiny-resnet"]
    assert desc.backends == ("sparse", "dense", "auto")
    assert desc.input_shape == (3, 64, 64) and desc.num_classes == 1000
    assert desc.device == "cpu" and desc.precision == "fp32"
    card = json.loads(json.dumps(desc.card))
    layers = {layer["name"]: layer for layer in card["layers"]}
    assert layers["layer1.0.conv2"]["backend"]["sparse"] == "sparse"
    assert layers["layer1.0.conv2"]["backend"]["dense"] == "dense"
    assert layers["layer1.0.conv2"]["sparsity"] == pytest.approx(0.85, abs=0.01)
    assert "1" in layers["layer1.0.conv2"]["time_s"]["dense"]  # auto measured on CPU at b1
    assert layers["fc"]["kind"] == "linear"
    assert set(desc.layer_sparsity) == set(layers)
    assert card["conv_layers"] == 20


def test_bad_requests_raise_clear_errors(engine) -> None:
    ok = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(UnknownModelError, match="available: tiny-resnet"):
        engine.infer("resnet-nope", "dense", ok)
    with pytest.raises(UnknownBackendError, match="loaded: sparse, dense, auto"):
        engine.infer("tiny-resnet", "cudnn", ok)
    with pytest.raises(BadBatchError, match=r"\[N, 3, 64, 64\]"):
        engine.infer("tiny-resnet", "dense", np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(BadBatchError, match="float32 or float16"):
        engine.infer("tiny-resnet", "dense", np.zeros((1, 3, 64, 64), np.int64))
    with pytest.raises(BadBatchError, match="max_batch_size 8"):
        engine.infer("tiny-resnet", "dense", np.zeros((9, 3, 64, 64), np.float32))
    assert engine.infer("tiny-resnet", "dense", np.zeros((0, 3, 64, 64), np.float32)).shape == (
        0,
        1000,
    )


def test_concurrent_callers_get_their_own_results(engine) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 3, 64, 64)).astype(np.float32) for _ in range(4)]
    want = [engine.infer("tiny-resnet", "sparse", b) for b in batches]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        got[i] = engine.infer("tiny-resnet", "sparse", batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(got[i], want[i], atol=1e-6)


def test_profiling_samples_one_batch_in_n(tmp_path, stand_in_plan) -> None:
    calls: list[tuple] = []
    engine = _engine(
        tmp_path,
        ("sparse",),
        stand_in_plan,
        observer=lambda *a: calls.append(a),
        layer_profile_every=3,
    )
    runner = engine.runner("tiny-resnet", "sparse")
    layers = {name for name, _ in runner.profiler.layers}
    batch = np.zeros((2, 3, 64, 64), np.float32)
    for i in range(1, 7):
        before = len(calls)
        engine.infer("tiny-resnet", "sparse", batch)
        sampled = calls[before:]
        if i % 3:
            assert sampled == []
        else:
            assert {c[2] for c in sampled} == layers
            assert all(c[:2] == ("tiny-resnet", "sparse") and c[4] > 0 for c in sampled)
            assert {c[5] for c in sampled} == {2}  # the batch's size (no buckets on the CPU)
    ops = {c[2]: c[3] for c in calls}
    assert ops["layer1.0.conv2"] == "conv_sparse" and ops["fc"] == "linear"
    assert ops["maxpool"] == "pool" and ops["avgpool"] == "pool"
    assert len(calls) == 2 * len(layers)


def test_profiling_off_and_observer_errors_do_not_break_inference(tmp_path, stand_in_plan):
    def broken(*args):
        raise RuntimeError("metrics down")

    engine = _engine(tmp_path, ("dense",), stand_in_plan, observer=broken, layer_profile_every=1)
    out = engine.infer("tiny-resnet", "dense", np.zeros((1, 3, 64, 64), np.float32))
    assert out.shape == (1, 1000)
    off = _engine(tmp_path, ("dense",), observer=broken, layer_profile_every=0)
    off.infer("tiny-resnet", "dense", np.zeros((1, 3, 64, 64), np.float32))


def test_label_count_must_match_outputs(tmp_path) -> None:
    source = _source()
    source.labels = ("cat", "dog")
    spec = EngineSpec(models=("tiny-resnet",), backends=("dense",), device="cpu")
    with pytest.raises(ValueError, match="outputs 1000 classes but its manifest lists 2"):
        TorchEngine(spec, [source], progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backends", ("fast",), "unknown backend 'fast'"),
        ("precision", "int8", "unknown precision"),
        ("device", "tpu", "device"),
        ("max_batch_size", 0, "max_batch_size"),
    ],
)
def test_bad_specs_are_refused(field, value, message) -> None:
    kw = {"models": ("x",), "backends": ("dense",), "device": "cpu", field: value}
    with pytest.raises(ValueError, match=message):
        TorchEngine(EngineSpec(**kw), [_source("x")], progress=False)


def test_unknown_model_name_lists_the_manifests(tmp_path) -> None:
    for name in ("my-net", "efficientnet-lite0"):
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\n')
    (tmp_path / "README.md").write_text("not a manifest")
    # The user's folder, then the shipped manifests, as one list.
    names = available_models(tmp_path)
    assert {"my-net", "efficientnet-lite0", "resnet50-uniform90", "vgg16-deepcompression"} <= set(
        names
    )
    assert names == sorted(names) and "README" not in names
    spec = EngineSpec(
        models=("resnet-50",), backends=("dense",), device="cpu", models_dir=str(tmp_path)
    )
    with pytest.raises(UnknownModelError) as info:
        load_engine(spec, progress=False)
    message = str(info.value)
    assert "'resnet-50'" in message
    assert "efficientnet-lite0, my-net, resnet50-skimcaffe" in message
    assert str(tmp_path) in message
    assert isinstance(info.value, LookupError)


def test_concurrent_profiling_with_shared_sparse_ops(tmp_path, stand_in_plan) -> None:
    """sparse and auto share their sparse ops; each runner's samples stay its own."""
    calls: list[tuple] = []
    lock = threading.Lock()

    def observe(*args) -> None:
        with lock:
            calls.append(args)

    def timer(op, layer, batch):  # auto picks sparse everywhere
        return 1.0 if op.op_kind == "conv_dense" else 0.5

    spec = EngineSpec(
        models=("tiny-resnet",),
        backends=("sparse", "auto"),
        device="cpu",
        layer_profile_every=1,
        cache_dir=str(tmp_path),
    )
    engine = TorchEngine(
        spec, [_source()], observe, progress=False, plan_factory=stand_in_plan, timer=timer
    )
    sparse = engine.runner("tiny-resnet", "sparse")
    assert any(m is sparse.module.get_submodule("conv1") for m in _auto_sparse_ops(engine))
    batch = np.zeros((1, 3, 64, 64), np.float32)
    threads = [
        threading.Thread(
            target=lambda b=b: [engine.infer("tiny-resnet", b, batch) for _ in range(3)]
        )
        for b in ("sparse", "auto")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    layers = len(sparse.profiler.layers)
    for backend in ("sparse", "auto"):
        mine = [c for c in calls if c[1] == backend]
        assert len(mine) == 3 * layers, backend
        assert all(c[3] == "conv_sparse" for c in mine if c[2] == "layer1.0.conv1")


def _auto_sparse_ops(engine):
    auto = engine.runner("tiny-resnet", "auto").module
    return [m.sparse for m in auto.modules() if hasattr(m, "choice")]


def test_a_model_loads_and_unloads_at_run_time(tmp_path, stand_in_plan) -> None:
    spec = EngineSpec(models=("tiny-resnet",), backends=("sparse", "dense"), device="cpu",
                      max_batch_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    loads: list[str] = []

    def load(name: str, models_dir: str, progress: bool) -> ModelSource:
        loads.append(name)
        if name != "tiny-b":
            raise UnknownModelError(name, ["tiny-b"])
        return _source("tiny-b")

    engine = TorchEngine(spec, [_source()], progress=False, plan_factory=stand_in_plan, load=load)
    try:
        desc = engine.load_model("tiny-b")
        assert desc.name == "tiny-b" and set(engine.describe()) == {"tiny-resnet", "tiny-b"}
        batch = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
        np.testing.assert_allclose(
            engine.infer("tiny-b", "sparse", batch), engine.infer("tiny-resnet", "sparse", batch),
            rtol=1e-4, atol=1e-6,
        )  # fmt: skip
        assert engine.load_model("tiny-b").name == "tiny-b"
        assert loads == ["tiny-b"]  # loaded already: not built twice
        with pytest.raises(UnknownModelError):
            engine.load_model("nope")
        assert set(engine.describe()) == {"tiny-resnet", "tiny-b"}  # a failed load leaves none
        engine.unload_model("tiny-b")
        assert set(engine.describe()) == {"tiny-resnet"}
        with pytest.raises(UnknownModelError):
            engine.infer("tiny-b", "sparse", batch)
    finally:
        engine.close()
