"""Corpora, calibration windows and perplexity windows.

Text is Jane Austen (public domain, bundled gzipped in the package, minillm/resources/austen). Perplexity is measured on *Pride and
Prejudice*; calibration windows come only from the other five novels, so the two never overlap.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

# the bundled texts and tasks travel inside the package (package data), so an installed minillm finds them wherever
# it is imported from; MINILLM_DATA points to another copy
DATA_DIR = Path(os.environ.get("MINILLM_DATA") or Path(__file__).resolve().parent / "resources")
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
PPL_NOVEL = "prideprejudice"
CALIBRATION_NOVELS = tuple(n for n in NOVELS if n != PPL_NOVEL)


def data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.exists():
        raise FileNotFoundError(
            f"data file {path} is missing (minillm/resources/ ships inside the package; regenerate it with "
            f"the scripts beside it, see minillm/resources/README.md)"
        )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_checksums() -> dict[str, bool]:
    """Check every file listed in SHA256SUMS of the bundled resources; returns {relative path: ok}."""
    sums = data_file("SHA256SUMS").read_text().split("\n")
    out = {}
    for line in filter(None, sums):
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        out[name] = (DATA_DIR / name).exists() and sha256(DATA_DIR / name) == digest
    return out


@lru_cache(maxsize=8)
def read_novel(name: str) -> str:
    if name not in NOVELS:
        raise ValueError(f"unknown novel {name!r}; bundled: {', '.join(NOVELS)}")
    with gzip.open(data_file(f"austen/{name}.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read()


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize_novels(tokenizer, novels: tuple[str, ...]) -> torch.Tensor:
    """Token ids of the novels joined by blank lines, without special tokens (cached per tokenizer in the process,
    and on disk for fast tokenizers: see `_disk_cached_ids`)."""
    key = (getattr(tokenizer, "name_or_path", type(tokenizer).__name__), len(tokenizer), novels)
    if key not in _TOKEN_CACHE:
        text = "\n\n".join(read_novel(n) for n in novels)
        _TOKEN_CACHE[key] = _disk_cached_ids(tokenizer, text)
    return _TOKEN_CACHE[key]


def _disk_cached_ids(tokenizer, text: str) -> torch.Tensor:
    """`tokenizer(text)` ids, kept in the cache directory (MINILLM_CACHE/tokens, .npy, no pickle) under the SHA-256 of
    the fast tokenizer's full serialisation (vocabulary, merges, normalizer, pre-tokenizer, added tokens) and of the
    text: every process that tokenizes the same novels with the same tokenizer (pytest workers, notebook kernels, CLI
    runs) reads them instead of spending seconds on it (SmolLM2 on the calibration novels: 2.8 s). Slow tokenizers,
    which have no serialisation to key on, are not cached; an unwritable cache is skipped."""
    import numpy as np

    from .files import cache_dir

    backend = getattr(tokenizer, "backend_tokenizer", None)
    path = None
    if backend is not None:
        digest = hashlib.sha256(backend.to_str().encode())
        digest.update(b"\0" + text.encode())
        path = cache_dir() / "tokens" / f"{digest.hexdigest()}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
            except (OSError, ValueError):
                pass  # a damaged entry: tokenize again and replace it
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, ids.numpy().astype(np.int32 if len(tokenizer) < 2**31 else np.int64))
            os.replace(tmp, path)
        except OSError:
            pass
    return ids


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts BOS in front of a text by itself (Gemma: the model was trained with it and its
    perplexity doubles without it); False for SmolLM2, whose tokenizer adds no special token."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _bos(tokenizer, add_bos: bool | None) -> int | None:
    """BOS id to prepend to every window: only for tokenizers that add one themselves (e.g. Gemma), unless told
    otherwise. The novels are tokenized once without special tokens, so each window gets its own BOS."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    return tokenizer.bos_token_id if add_bos else None


def calibration_windows(
    tokenizer,
    n_samples: int,
    seqlen: int,
    seed: int = 0,
    novels: tuple[str, ...] = CALIBRATION_NOVELS,
    add_bos: bool | None = None,
) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from the calibration novels: LongTensor [n_samples, seqlen].
    Start offsets come from a generator seeded with `seed` (the global RNG is untouched)."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} x {seqlen}")
    if PPL_NOVEL in novels:
        raise ValueError(f"{PPL_NOVEL} is the perplexity text and cannot be used for calibration")
    ids = tokenize_novels(tokenizer, tuple(novels))
    bos = _bos(tokenizer, add_bos)
    body = seqlen - (bos is not None)
    if ids.numel() <= body:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n_samples,), generator=gen)
    windows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def perplexity_windows(
    tokenizer, seqlen: int, n_windows: int | None = None, novel: str = PPL_NOVEL, add_bos: bool | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens from the start of `novel`: LongTensor [n, seqlen]
    (all complete windows when `n_windows` is None). For a tokenizer that adds BOS (Gemma) every window is BOS
    followed by seqlen - 1 text tokens (BOS is never a prediction target); otherwise seqlen text tokens, unchanged.
    `add_bos` forces either behaviour."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    ids = tokenize_novels(tokenizer, (novel,))
    bos = _bos(tokenizer, add_bos)
    body = seqlen - (bos is not None)
    available = ids.numel() // body
    n = available if n_windows is None else n_windows
    if n < 1 or n > available:
        raise ValueError(f"{novel} has {available} windows of {seqlen} tokens, asked for {n_windows}")
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def describe_calibration(n_samples: int, seqlen: int, seed: int, novels=CALIBRATION_NOVELS) -> dict:
    return {
        "source": "austen",
        "novels": list(novels),
        "n_samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "sampling": "uniform random start offsets over the concatenated novels",
    }
