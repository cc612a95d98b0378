"""fastbp.bench.profile: the per-layer time of a training step."""

import json

import numpy as np


def test_profile_times_every_layer_call_and_unwraps_them():
    from fastbp import nets
    from fastbp.bench import profile as prof

    net = nets.TwoLayerNet(20, 8, 4, dtype=np.float32)
    x = np.random.default_rng(0).random((5, 20)).astype(np.float32)
    t = np.array([0, 1, 2, 3, 0])
    want = {k: np.array(v) for k, v in net.gradient(x, t).items()}
    calls = []
    real = net.layers["Relu1"].forward
    r = prof.profile(net, lambda: calls.append(net.gradient(x, t)), steps=7, warmup=2)
    assert len(calls) == 9
    assert list(r["layers"]) == [  # (fastbp's net runs Relu1 on Affine1's output itself: no layer call)
        "Affine1.forward", "Affine2.forward", "lastLayer.forward",
        "lastLayer.backward", "Affine2.backward", "Affine1.backward",
    ]  # fmt: skip
    assert all(v > 0 for v in r["layers"].values())
    # each step's layer sum is part of that step, so its median is too
    assert 0 < r["layers_us"] <= r["step_us"] and r["rest_us"] == r["step_us"] - r["layers_us"]
    # the wrappers are gone and did not change the results
    assert "forward" not in vars(net.layers["Relu1"]) and net.layers["Relu1"].forward == real
    for k, v in net.gradient(x, t).items():
        assert np.array_equal(v, want[k])


def test_profile_main_runs_the_book_net(capsys, tmp_path):
    from fastbp.bench import profile as prof

    out = tmp_path / "p.json"
    res = prof.main(["--nets", "book", "--steps", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert "book: step" in text and "Affine1.backward" in text and "SIMD path" in text
    assert set(json.loads(out.read_text())) == {"book"} and res["book"]["step_us"] > 0


def test_pool_use_is_per_region_and_per_worker_block():
    from fastbp.bench.profile import _pool_use

    keys = ("regions", "caller_block_us", "caller_wait_us", "worker_blocks", "worker_block_us", "worker_starts")
    keys += ("worker_start_us",)
    before = dict(zip(keys, (5, 100.0, 10.0, 4, 90.0, 4, 2.0)))
    after = dict(zip(keys, (25, 900.0, 50.0, 44, 890.0, 24, 12.0)))
    assert _pool_use(before, after, 10) == {
        "regions_per_step": 2.0,
        "caller_block_us": 40.0,
        "caller_wait_us": 2.0,
        "worker_blocks_per_region": 2.0,
        "worker_block_us": 20.0,
        "worker_start_us": 0.5,
    }
    nothing = _pool_use(before, before, 10)
    assert nothing["regions_per_step"] == 0 and all(v is None for k, v in nothing.items() if k != "regions_per_step")


def test_profile_reports_the_pool_of_a_step_that_opens_regions(capsys):
    from fastbp import _gemm, _threads, nets
    from fastbp.bench import profile as prof

    net = nets.TwoLayerNet(784, 50, 10, dtype=np.float32)
    x = np.random.default_rng(1).random((100, 784)).astype(np.float32)
    t = np.arange(100) % 10
    r = prof.profile(net, lambda: net.gradient(x, t), steps=20, warmup=3)
    p = r["pool"]
    if p["regions_per_step"]:
        # every region has the caller's blocks (with several GEMM threads the two 100 x 784 x 50 products are split)
        assert p["caller_block_us"] > 0 and p["caller_wait_us"] >= 0
        if _gemm._get_gemm_threads() > 1:
            assert p["regions_per_step"] >= 2
    else:
        assert p["caller_block_us"] is None
    assert _threads.pool_stats() is False  # switched on for the timed steps only
    prof._report("own", r, None)
    assert "own: step" in capsys.readouterr().out


def test_profile_restores_the_pool_timing_switch_when_a_step_raises():
    import pytest

    from fastbp import _threads, nets
    from fastbp.bench import profile as prof

    net = nets.TwoLayerNet(20, 8, 4, dtype=np.float32)
    calls = []

    def step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")

    for was in (False, True):
        _threads.pool_stats(was)
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            prof.profile(net, step, steps=5, warmup=2)
        assert _threads.pool_stats(False) is was
