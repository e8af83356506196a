"""Bundled data: checksums, window construction, calibration/evaluation separation, clear errors."""

import json

import pytest
import torch

from minillm import data
from minillm.evaluate import load_task_specs, perplexity, task_yaml


class CharTokenizer:
    """A tokenizer stand-in: one id per character (enough to test window logic without a model)."""

    name_or_path = "char"
    bos_token_id = None

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 255) for c in text]}


def test_bundled_files_match_checksums():
    result = data.verify_checksums()
    assert len(result) >= 13 and all(result.values()), result


def test_novels_and_missing_file(monkeypatch, tmp_path):
    assert "It is a truth universally acknowledged" in data.read_novel("prideprejudice")[:2000]
    with pytest.raises(ValueError, match="unknown novel"):
        data.read_novel("ulysses")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    data.read_novel.cache_clear()
    with pytest.raises(FileNotFoundError, match="data file .*emma.txt.gz is missing"):
        data.read_novel("emma")
    data.read_novel.cache_clear()


def test_calibration_windows_are_seeded_and_exclude_ppl_text():
    tok = CharTokenizer()
    a = data.calibration_windows(tok, 5, 40, seed=1)
    b = data.calibration_windows(tok, 5, 40, seed=1)
    c = data.calibration_windows(tok, 5, 40, seed=2)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    pp = "".join(chr(i) for i in data.tokenize_novels(tok, ("prideprejudice",)).tolist())
    for row in a:
        assert "".join(map(chr, row.tolist())) not in pp
    with pytest.raises(ValueError, match="cannot be used for calibration"):
        data.calibration_windows(tok, 2, 10, novels=("prideprejudice",))
    with pytest.raises(ValueError, match="n_samples >= 1"):
        data.calibration_windows(tok, 0, 10)


def test_perplexity_windows_are_consecutive_from_the_start():
    tok = CharTokenizer()
    w = data.perplexity_windows(tok, 100, 3)
    text = data.read_novel("prideprejudice")
    assert "".join(map(chr, w.reshape(-1).tolist())) == text[:300]
    with pytest.raises(ValueError, match="asked for"):
        data.perplexity_windows(tok, 100, 10**6)


def test_perplexity_is_token_weighted_exp_nll(tiny):
    model = tiny("tiny-llama")
    windows = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), windows[:, 1:].reshape(-1))
    assert res["tokens"] == 24 and res["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_task_specs_and_yaml():
    specs = load_task_specs()
    names = {s["task"] for s in specs}
    assert {"bb_cloze_hyperbaton", "bb_cloze_social_iqa", "bb_cloze_strategyqa"} <= names
    for s in specs:
        assert s["metric"] in ("acc", "acc_norm")
        first = json.loads((data.DATA_DIR / "bigbench" / s["file"]).read_text().split("\n")[0])
        assert 0 <= first["label"] < len(first["choices"]) and "canary" in first
    y = task_yaml(specs[0], data.DATA_DIR / "bigbench" / specs[0]["file"])
    assert "doc_to_choice: choices" in y and str(data.DATA_DIR) in y


def test_novel_tokens_are_cached_on_disk_per_tokenizer_and_text(tmp_path, monkeypatch):
    """The disk cache returns exactly what the tokenizer returns; another tokenizer or text gets its own entry; a
    damaged entry is tokenized again and replaced."""
    from conftest import tiny_tokenizer

    from minillm import data

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    a, b = tiny_tokenizer(300), tiny_tokenizer(384)
    text = data.read_novel("persuasion")[:20_000]
    fresh = a(text, add_special_tokens=False)["input_ids"]
    first = data._disk_cached_ids(a, text)
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert first.tolist() == fresh and first.dtype == torch.long and len(files) == 1
    assert data._disk_cached_ids(a, text).tolist() == fresh  # read back
    assert data._disk_cached_ids(b, text).tolist() == b(text, add_special_tokens=False)["input_ids"] != fresh
    shorter = text[:-100]
    assert data._disk_cached_ids(a, shorter).tolist() == a(shorter, add_special_tokens=False)["input_ids"]
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 3
    files[0].write_bytes(b"not an array")
    assert data._disk_cached_ids(a, text).tolist() == fresh
    assert data._disk_cached_ids(a, text).tolist() == fresh
