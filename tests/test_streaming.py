"""Layer-streamed scoring must choose exactly what in-memory scoring chooses."""

import pytest
import torch

import minillm
from minillm.streaming import stream_layers

FORWARD_ONLY = [
    ("wanda_sp", {}),
    ("flap", {}),
    ("fms", {"queries": 3}),
    ("fms", {"queries": 3, "space": "gates"}),
    ("bonsai", {"masks_per_round": 4, "prune_frac": 0.15}),
]


@pytest.mark.parametrize("method,opts", FORWARD_ONLY, ids=[m + str(len(o)) for m, o in FORWARD_ONLY])
@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-bloom"])
def test_streamed_equals_in_memory(tiny, name, method, opts):
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    a = minillm.prune(tiny(name), method, 0.3, calib, progress=False, **opts)
    b = minillm.prune(tiny(name), method, 0.3, calib, progress=False, stream_device="cpu", **opts)
    assert a.layers == b.layers
    assert b.options["stream_device"] == "cpu"


def test_stream_moves_each_layer_once_per_forward(tiny, tokens):
    model = tiny("tiny-opt")
    with torch.no_grad():
        dense = model(tokens).logits
        with stream_layers(model, "cpu") as counts:
            streamed = model(tokens).logits
    assert counts["to_device"] == 3
    assert torch.equal(dense, streamed)


def test_streaming_refuses_backprop(tiny):
    calib = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="forward-only"):
        minillm.prune(tiny("tiny-llama"), "taylor", 0.2, calib, stream_device="cpu")
