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
