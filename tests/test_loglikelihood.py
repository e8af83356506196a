"""ContinuationHFLM (LM head at continuation positions only) against lm-eval's HFLM, request by request."""

import json
from types import SimpleNamespace

import pytest
from lm_eval.models.huggingface import HFLM

from minillm.evaluate import DATA_DIR, load_task_specs, zeroshot
from minillm.loglikelihood import ContinuationHFLM
from test_gemma3 import _char_tokenizer


def _requests(per_task: int) -> list[SimpleNamespace]:
    """(context, continuation) pairs as lm-eval poses the bundled cloze tasks: the query, then " " + choice (lm-eval
    replaces an empty query by its prefix token)."""
    out = []
    for spec in load_task_specs():
        with open(DATA_DIR / "bigbench" / spec["file"]) as f:
            docs = [json.loads(line) for _, line in zip(range(per_task), f, strict=False)]
        for doc in docs:
            for choice in doc["choices"]:
                out.append(SimpleNamespace(args=(doc["query"], f" {choice}")))
    return out


def _both(model, tok, requests, batch_size=8, **kw):
    kw = {"tokenizer": tok, "device": "cpu", **kw}
    ref = HFLM(pretrained=model, batch_size=batch_size, **kw).loglikelihood(requests, disable_tqdm=True)
    new = ContinuationHFLM(pretrained=model, batch_size=batch_size, **kw).loglikelihood(requests, disable_tqdm=True)
    return ref, new


def _assert_same(ref, new, atol):
    assert len(ref) == len(new)
    worst = max(abs(a[0] - b[0]) for a, b in zip(ref, new, strict=True))
    assert worst <= atol, worst
    assert [a[1] for a in ref] == [b[1] for b in new]
    assert len({round(a[0], 3) for a in ref}) > len(ref) // 2  # the requests score differently: a real comparison


@pytest.mark.parametrize(
    "name,add_bos,softcap",
    [("tiny-llama-gqa", False, None), ("tiny-gemma3", True, None), ("tiny-gemma3", True, 3.0)],
)
def test_continuation_scorer_equals_hflm_on_the_bundled_tasks(tiny, name, add_bos, softcap):
    model = tiny(name)
    model.config.max_position_embeddings = 4096  # one token a character: no truncation here
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    tok = _char_tokenizer(add_bos)
    ref, new = _both(model, tok, _requests(3), add_bos_token=add_bos)
    _assert_same(ref, new, atol=1e-4)


def test_continuation_scorer_applies_gemma_softcapping(tiny):
    """The head runs inside the model's own forward, so the soft-capping that follows it is kept."""
    model, tok = tiny("tiny-gemma3"), _char_tokenizer(True)
    model.config.max_position_embeddings = 4096
    reqs = _requests(1)
    plain = ContinuationHFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    model.config.final_logit_softcapping = 0.5
    ref, capped = _both(model, tok, reqs, batch_size=4, add_bos_token=True)
    _assert_same(ref, capped, atol=1e-4)
    assert max(abs(a[0] - b[0]) for a, b in zip(plain, capped, strict=True)) > 1e-2


def test_continuation_scorer_truncates_and_batches_like_hflm(tiny):
    """Requests longer than the model's length lose context from the left, as in HFLM; any batch size (rows of
    different lengths padded together, one row alone) gives the same scores."""
    model, tok = tiny("tiny-llama"), _char_tokenizer(False)
    reqs = [r for r in _requests(2) if len(r.args[1]) <= 40]  # HFLM asserts a continuation fits
    assert max(len(r.args[0]) + len(r.args[1]) for r in reqs) > 41  # some requests are truncated
    ref, new = _both(model, tok, reqs, batch_size=5, max_length=40)
    _assert_same(ref, new, atol=1e-4)
    alone = ContinuationHFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=40)
    _assert_same(new, alone.loglikelihood(reqs, disable_tqdm=True), atol=1e-4)


def test_continuation_scorer_refuses_a_model_whose_head_sees_other_states(tiny):
    model, tok = tiny("tiny-llama"), _char_tokenizer(False)
    model.config.max_position_embeddings = 4096
    lm = ContinuationHFLM(pretrained=model, tokenizer=tok, batch_size=4)
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: (args[0][:, -1:],))  # e.g. last position only
    try:
        with pytest.raises(RuntimeError, match="output embedding received"):
            lm.loglikelihood(_requests(1)[:3], disable_tqdm=True)
    finally:
        hook.remove()


def test_zeroshot_scorers_agree_end_to_end(tiny):
    model, tok = tiny("tiny-gemma3"), _char_tokenizer(True)
    model.config.max_position_embeddings = 4096
    tasks = ["bb_cloze_strategyqa", "bb_cloze_wikihow_goal"]
    a = zeroshot(model, tok, tasks=tasks, limit=6, batch_size=4, stderr=True, scorer="hflm")
    b = zeroshot(model, tok, tasks=tasks, limit=6, batch_size=4, stderr=True)
    assert "HFLM" in a["scorer"] and "ContinuationHFLM" in b["scorer"]
    for t in tasks:
        assert (a[t]["value"], a[t]["stderr"], a[t]["n"]) == (b[t]["value"], b[t]["stderr"], b[t]["n"])
    with pytest.raises(ValueError, match="scorer"):
        zeroshot(model, tok, tasks=tasks, limit=2, scorer="vllm")


@pytest.mark.slow
def test_continuation_scorer_equals_hflm_on_smollm2(smollm2):
    model, tok = smollm2
    ref, new = _both(model, tok, _requests(4), batch_size=16)
    _assert_same(ref, new, atol=1e-3)
