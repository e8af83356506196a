"""Semi-structured 2:4 baseline: the pattern holds, the right weights survive, reload is exact."""

import pytest
import torch

import minillm
from minillm.scores.nm_sparsity import nm_mask
from minillm.semi_structured import to_semi_structured


def test_nm_mask_keeps_the_two_largest_of_every_four():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2], [9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 2.0, 3.0]])
    keep = nm_mask(scores)
    assert keep.tolist() == [
        [False, True, True, False, False, True, True, False],
        [True, True, False, False, False, False, True, True],
    ]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6))


@pytest.mark.parametrize("method", ["wanda_24", "magnitude_24"])
@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_pattern_and_reload(tiny, tokens, tmp_path, method, name):
    model = tiny(name)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = minillm.prune(model, method, 0.5, calib, progress=False)
    assert plan.history[0]["weight_sparsity"] == pytest.approx(0.5)
    adapter = minillm.get_adapter(model)
    for layer in adapter.layers():
        for lin in adapter.linears(layer):
            groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2
    names = {id(p): n for n, p in model.named_parameters()}
    lin = adapter.mlp_members(adapter.layers()[0])[0].linear
    if method == "magnitude_24":  # survivors are the two largest |W| of each group of the original weights
        orig = ref[names[id(lin.weight)]]
        expect = nm_mask(orig.abs())
        assert torch.equal(lin.weight != 0, expect)
    minillm.save_pruned(model, plan, tmp_path / "p")
    again, _ = minillm.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_same_seed_same_mask_and_clear_errors(tiny):
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    a, b = tiny("tiny-llama"), tiny("tiny-llama")
    minillm.prune(a, "wanda_24", 0.5, calib, progress=False)
    minillm.prune(b, "wanda_24", 0.5, calib, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="pass sparsity=0.5"):
        minillm.prune(tiny("tiny-llama"), "wanda_24", 0.3, calib)
    assert "CUDA" in to_semi_structured(a)["reason"]
