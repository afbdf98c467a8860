"""Runner.launch_rows / collect: two batches in flight, rows from page-locked memory (as the
engine process's arenas are) and from ordinary arrays, FP16 rows into an fp32 model. Each
answer must equal the same batch run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.assemble import build_backend
from service.engine.profiler import LayerProfiler, profiled_layers
from service.engine.runner import Runner
from tests.engine.test_gpu import BUCKETS, _images, _model, _runner

pytestmark = pytest.mark.gpu


def _pinned_rows(batch: np.ndarray) -> tuple[list[np.ndarray], torch.Tensor]:
    """Rows as separate views of one page-locked buffer (what a registered arena gives)."""
    buffer = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
    array = buffer.numpy()
    return [array[i] for i in range(len(array))], buffer


def _sparse_runner() -> Runner:
    """resnet50-uniform90 on the sparse backend, graphs captured, default kernel configs."""
    _, prepared = _model("resnet50-uniform90")
    sparse = build_backend(prepared, "sparse", torch.device("cuda"), "fp32", buckets=BUCKETS,
                           tune_kernel=False)  # fmt: skip
    return _runner(sparse, prepared, graphs=True)


def test_two_batches_in_flight_answer_like_one_at_a_time() -> None:
    runner = _sparse_runner()
    images = _images("resnet50-uniform90", 32)
    first, second, third = images[:32], images[:7][::-1].copy(), images[3:11]
    alone = [runner.infer(x) for x in (first, second, third)]
    rows_a, keep_a = _pinned_rows(first)
    rows_b, keep_b = _pinned_rows(second)
    assert rows_a[0].flags.writeable and torch.from_numpy(rows_a[0]).is_pinned()
    a = runner.launch_rows(rows_a)  # bucket 32
    b = runner.launch_rows(rows_b)  # bucket 8, launched while the first may still run
    got_a, got_b = runner.collect(a), runner.collect(b)
    c = runner.launch_rows(list(third))  # ordinary (pageable) rows take the staged path
    d = runner.launch_rows(rows_a)  # a third launch reuses the first batch's slot
    got_c, got_d = runner.collect(c), runner.collect(d)
    for got, want in ((got_a, alone[0]), (got_b, alone[1]), (got_c, alone[2]), (got_d, alone[0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    del keep_a, keep_b
    runner.close()


def test_rows_pushed_ahead_to_the_device_mirror_answer_like_rows_copied_at_launch() -> None:
    from service.engine.hostcopy import DeviceMirror, PinnedRanges

    runner = _sparse_runner()
    images = _images("resnet50-uniform90", 24)
    first, second = images[:12], images[12:]
    want_first, want_second = runner.infer(first), runner.infer(second)
    rows, keep = _pinned_rows(first)  # one page-locked buffer standing in for an arena
    address, size = keep.data_ptr(), keep.numel() * keep.element_size()
    runner.pinned, runner.mirror = PinnedRanges(), DeviceMirror(torch.device("cuda"))
    runner.pinned.add(address, size)
    runner.mirror.add(address, size)
    # Pushed, then the host rows changed behind the mirror's back (which the engine process
    # never does): the batch answers for the pushed rows, so it gathered them on the device.
    runner.mirror.push(rows)
    runner.mirror.stream.synchronize()  # the copies read the rows before they change
    for i, row in enumerate(rows):
        row[...] = second[i]
    np.testing.assert_allclose(runner.infer_rows(rows), want_first, rtol=1e-5, atol=1e-5)
    # Taken rows are forgotten: the next batch of the same slots crosses from the host.
    np.testing.assert_allclose(runner.infer_rows(rows), want_second, rtol=1e-5, atol=1e-5)
    # Some pushed, some not, in one batch: each row from where it is fresh.
    for i, row in enumerate(rows):
        row[...] = first[i]
    runner.mirror.push(rows[::2])
    runner.mirror.stream.synchronize()
    for i, row in enumerate(rows):
        row[...] = second[i]
    mixed = want_second.copy()
    mixed[::2] = want_first[::2]
    np.testing.assert_allclose(runner.infer_rows(rows), mixed, rtol=1e-5, atol=1e-5)
    # Pushed as they are: the same as copied at launch.
    runner.mirror.push(rows)
    np.testing.assert_allclose(runner.infer_rows(rows), want_second, rtol=1e-5, atol=1e-5)
    runner.mirror.remove(address)
    del keep
    runner.close()


def test_fp16_rows_are_cast_on_the_device() -> None:
    _, prepared = _model("resnet50-uniform90")
    cuda = torch.device("cuda")
    dense = build_backend(prepared, "dense", cuda, "fp32")
    runner = _runner(dense, prepared, graphs=True)
    half = _images("resnet50-uniform90", 8).astype(np.float16)
    want = runner.infer(half.astype(np.float32))
    rows, keep = _pinned_rows(half)
    np.testing.assert_allclose(runner.collect(runner.launch_rows(rows)), want, rtol=1e-5, atol=1e-5)
    mixed = [rows[0], half[1].astype(np.float32), *rows[2:]]  # one fp32 row among fp16 ones
    np.testing.assert_allclose(runner.infer_rows(mixed), want, rtol=1e-5, atol=1e-5)
    del keep
    runner.close()


def test_photos_decode_on_the_gpu_like_on_the_cpu() -> None:
    from pathlib import Path

    from service.engine.decode import decode_rows
    from service.engine.protocol import Preprocessing

    data = Path(__file__).resolve().parents[1] / "data"
    spec = Preprocessing(resize=256, crop=224, mean=(123.675, 116.28, 103.53), std=(58.4,) * 3)
    photos = [np.frombuffer((data / n).read_bytes(), np.uint8) for n in ("cat.jpg", "coffee.jpg")]
    on_gpu, failed = decode_rows(photos, spec, torch.device("cuda"))
    on_cpu, _ = decode_rows(photos, spec, torch.device("cpu"))
    assert failed == []
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.is_cuda
        # nvJPEG and libjpeg round their IDCTs differently: close, not equal.
        assert float((gpu.cpu() - cpu).abs().mean()) < 0.02
    _, prepared = _model("resnet50-uniform90")
    dense = build_backend(prepared, "dense", torch.device("cuda"), "fp32")
    runner = _runner(dense, prepared, graphs=True)
    runner.preprocessing = spec
    rows, keep = _pinned_rows(_images("resnet50-uniform90", 2))
    mixed = runner.infer_rows([photos[0], rows[0], photos[1][:400].copy(), rows[1]])
    want = runner.infer(np.stack([on_gpu[0].cpu().numpy(), rows[0]]))
    np.testing.assert_allclose(mixed[:2], want, rtol=1e-4, atol=1e-4)
    assert np.isnan(mixed[2]).all() and np.isfinite(mixed[3]).all()
    del keep
    runner.close()


def test_each_batch_reports_its_device_stages() -> None:
    _, prepared = _model("resnet50-uniform90")
    dense = build_backend(prepared, "dense", torch.device("cuda"), "fp32")
    runner = _runner(dense, prepared, graphs=True)
    seen: list[tuple[str, float]] = []
    runner.stage_observer = lambda model, backend, stage, s: seen.append((stage, s))
    rows, keep = _pinned_rows(_images("resnet50-uniform90", 32))
    for _ in range(3):
        runner.infer_rows(rows)
    stages = {stage for stage, _ in seen}
    assert stages == {"h2d", "replay", "d2h"} and len(seen) == 9
    replay = sorted(s for stage, s in seen if stage == "replay")[1]
    h2d = sorted(s for stage, s in seen if stage == "h2d")[1]
    # 32 rows of 602 KB over PCIe take well under the batch itself; the replay is milliseconds.
    assert 1e-3 < replay < 0.1 and 0 < h2d < replay
    del keep
    runner.close()


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_a_sampled_batch_replays_its_timed_graph(backend: str) -> None:
    _, prepared = _model("resnet50-uniform90")
    built = build_backend(prepared, backend, torch.device("cuda"), "fp32", buckets=BUCKETS,
                          tune_kernel=False)  # fmt: skip
    layers: list[tuple[str, str, float, int]] = []
    stages: list[tuple[str, float]] = []
    runner = Runner(
        built, model_name="m", input_shape=prepared.input_shape, max_batch_size=max(BUCKETS),
        buckets=BUCKETS, probabilities=False, profile_every=2,
        observer=lambda model, backend, layer, op, s, n: layers.append((layer, op, s, n)),
        stage_observer=lambda model, backend, stage, s: stages.append((stage, s)),
    )  # fmt: skip
    runner.warm()
    assert runner.timed_buckets == BUCKETS
    images = _images("resnet50-uniform90", 32)
    rows, keep = _pinned_rows(images[:7])
    first = runner.infer_rows(rows)
    assert layers == []  # the first batch is not sampled
    sampled = runner.infer_rows(rows)  # the second is: bucket 8's timed graph
    np.testing.assert_allclose(sampled, first, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in profiled_layers(runner.module)]
    # Every layer once (in the order the forward runs them: a block's downsample comes last).
    assert sorted(layer for layer, _, _, _ in layers) == sorted(names)
    assert all(s > 0 for _, _, s, _ in layers)
    assert {n for _, _, _, n in layers} == {8}  # seven rows ran in bucket 8
    assert {op for _, op, _, _ in layers} >= {f"conv_{backend}", "linear", "pool"}
    # The layers run back to back inside the replay: their times add up to most of it (the
    # rest: adds, flattening, the events), and never to more.
    replay = [s for stage, s in stages if stage == "replay"][1]
    total = sum(s for _, _, s, _ in layers)
    assert 0.6 * replay < total <= 1.02 * replay, (total, replay)
    assert "profile" not in {stage for stage, _ in stages}  # no eager pass held the device
    runner.infer_rows(rows)
    assert len(layers) == len(names)  # the third batch is not sampled
    del keep
    runner.close()


def test_a_sampled_pass_reports_what_it_holds_the_device_for() -> None:
    # A profiler attached after warm-up: no timed graphs, so the eager pass (the CPU's, and a
    # bucket's whose timed graph could not be captured) runs after the sampled batch.
    _, prepared = _model("resnet50-uniform90")
    dense = build_backend(prepared, "dense", torch.device("cuda"), "fp32")
    runner = _runner(dense, prepared, graphs=True)
    runner.profiler = LayerProfiler(runner.module, runner.device)
    runner.observer = lambda *layer: None
    runner.profile_every = 2
    runner.batches = 0  # so that the second and fourth batches are the sampled ones
    seen: list[tuple[str, float]] = []
    runner.stage_observer = lambda model, backend, stage, s: seen.append((stage, s))
    rows, keep = _pinned_rows(_images("resnet50-uniform90", 32))
    for _ in range(4):
        runner.infer_rows(rows)
    torch.cuda.synchronize()
    runner.infer_rows(rows)  # reports the fourth batch's pass, finished by now
    profile = [s for stage, s in seen if stage == "profile"]
    replay = sorted(s for stage, s in seen if stage == "replay")[2]
    # Each pass is reported by the next batch, which runs after it on the same stream; a pass
    # runs every layer eagerly, with waits between them, so it outlasts a replay.
    assert len(profile) == 2 and all(s > replay for s in profile)
    del keep
    runner.close()
