"""accelerate device maps with offloaded layers: scoring and removal give what the in-memory model gives."""

import pytest
import torch

import minillm
from minillm.models import build_random
from minillm.offload import has_offloaded

METHODS = [
    ("wanda_sp", {}),
    ("flap", {}),
    ("magnitude", {}),
    ("fms", {"queries": 3, "space": "gates"}),
    ("fms", {"queries": 3}),
    ("bonsai", {"masks_per_round": 4, "prune_frac": 0.15}),
    ("wanda_24", {}),
    # the forward-only FMS estimators score on the offloaded model without loading it first
    ("fms", {"estimator": "ablation", "shortlist": 0.5, "batch_tokens": 256}),
    ("fms", {"estimator": "allocation", "queries": 16, "eps": 1e-2}),
]


@pytest.fixture
def checkpoint(tmp_path):
    model = build_random("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    return tmp_path


def _offloaded(path):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model, _ = minillm.load_model(str(path / "dense"), device_map=device_map, offload_folder=str(path / "offload"))
    assert has_offloaded(model)
    return model


@pytest.mark.parametrize("method,opts", METHODS, ids=[m + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for m, o in METHODS])
def test_offloaded_model_prunes_like_in_memory(checkpoint, tokens, method, opts):
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    sparsity = 0.5 if method == "wanda_24" else 0.3
    ref, _ = minillm.load_model(str(checkpoint / "dense"))
    a = minillm.prune(ref, method, sparsity, calib, progress=False, **opts)
    off = _offloaded(checkpoint)
    b = minillm.prune(off, method, sparsity, calib, progress=False, **opts)
    assert a.layers == b.layers
    assert not has_offloaded(off)
    with torch.no_grad():
        assert torch.allclose(off(tokens).logits, ref(tokens).logits, atol=1e-5)
