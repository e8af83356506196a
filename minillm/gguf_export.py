"""Export a pruned LLaMA-family model to one GGUF file that llama.cpp loads (and the tools built on it:
llama-cpp-python, ollama, LM Studio), written with the `gguf` package.

Two architectures of llama.cpp are used:

* `llama` when every decoder layer has the same widths (a per-layer uniform plan, or a global plan whose layers
  happen to agree): the stock LLaMA metadata with the smaller head counts and feed-forward length. transformers'
  GGUF loader reads this file too.
* `deci` otherwise: llama.cpp's loader for NVIDIA's Nemotron-NAS models reads `head_count`, `head_count_kv` and
  `feed_forward_length` as per-layer arrays and sizes each layer's tensors from them, so the file stores exactly the
  pruned widths (plus the `pad_to` rounding of the MLP width) with no zero padding to the widest layer. A layer whose
  attention was removed has 0 heads (llama.cpp skips its attention). Two cases keep a small zero block instead:
  an attention removed whose output projection carries a bias (FLAP's compensation, the centred refit) keeps one
  zero KV group so that the bias is added; and an MLP removed in a layer that keeps attention keeps `pad_to` zero
  channels, because llama.cpp's deci graph ends a layer whose feed-forward length is 0 before it adds the attention
  output to the residual stream (`src/models/deci.cpp`: the `n_ff == 0` branch continues the layer loop).

What the writer does to the weights (all exact except the chosen float type):

* q and k rows (and biases) are reordered within each head from transformers' rotate-half layout (pairs i and
  i + head_dim/2) to llama.cpp's adjacent pairs (2i, 2i + 1), the layout its `llama`/`deci` RoPE expects;
* MLP widths are rounded up per layer to a multiple of `pad_to` with zero gate/up rows and zero down columns (the
  row size of down_proj must be a multiple of 32 for Q8_0 and of 256 for the k-quants; default 32);
* 2-D tensors are stored as F32, F16 or BF16 (default: the model's own dtype), norms and biases always as F32;
* the LM head is omitted when it is tied to the embedding (llama.cpp then reuses `token_embd`).

The tokenizer is written as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`): every token in id order,
the merges, control/user-defined types of added tokens, BOS/EOS/UNK/PAD ids, whether BOS is prepended, the chat
template. llama.cpp splits text before BPE with a regex named by `tokenizer.ggml.pre`; it is derived from the
tokenizer's own pre-tokenizer where that is unambiguous (plain ByteLevel: `gpt-2`; individual digits then ByteLevel:
`smollm`) and must be given (`tokenizer_pre`) otherwise. SentencePiece tokenizers (LLaMA 1/2) are not written.

Other families are refused: Gemma 3 and BLOOM have no per-layer-width architecture in llama.cpp and OPT none at all;
their uniform-width exports in the stock transformers form (`minillm export --format hf`) go through llama.cpp's own
`convert_hf_to_gguf.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .export import ExportError, _params, _source, source_record
from .files import _umask
from .state import pruning_state
from .surgery import prunable_params

#: float types a tensor can be written in: name -> (torch dtype, GGML type name, file type name)
FLOAT_TYPES = {
    "f32": (torch.float32, "F32", "ALL_F32"),
    "f16": (torch.float16, "F16", "MOSTLY_F16"),
    "bf16": (torch.bfloat16, "BF16", "MOSTLY_BF16"),
}
DEFAULT_PAD_TO = 32
RECORD_KEY = "minillm.export"
_TMP_SUFFIX = ".minillm-tmp"


@dataclass(frozen=True)
class LayerWidths:
    """What one decoder layer stores in the GGUF: query heads, KV heads, MLP channels (0 heads: no attention)."""

    heads: int
    kv_heads: int
    channels: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _has_bias(linear: nn.Linear) -> bool:
    return linear.bias is not None and bool(linear.bias.detach().abs().max() > 0)


def plan_widths(model: nn.Module, pad_to: int = DEFAULT_PAD_TO) -> list[LayerWidths]:
    """Per layer, the widths written: the pruned head counts, and the MLP width rounded up to `pad_to`; the zero
    placeholders of the module docstring where llama.cpp could not express an empty block exactly."""
    adapter = get_adapter(model)
    group = max(adapter.original_attention.group_size, 1)
    out = []
    for layer in adapter.layers():
        shape = adapter.attention_shape(layer)
        heads, kv = shape.n_query_heads, shape.n_kv_heads
        if heads == 0 and _has_bias(adapter.attn_out_proj(layer)):
            heads, kv = group, 1
        channels = adapter.n_channels(layer)
        if channels == 0 and (heads > 0 or _has_bias(adapter.mlp_out_proj(layer))):
            channels = pad_to
        out.append(LayerWidths(heads, kv, _round_up(channels, pad_to)))
    return out


def _check_model(model: nn.Module) -> None:
    adapter = get_adapter(model)
    config = model.config
    if adapter.family != "llama":
        raise ExportError(
            f"GGUF export covers the LLaMA family (llama.cpp's llama and deci architectures); {adapter.family} has no "
            "llama.cpp architecture with per-layer widths. Export it with --format hf (uniform widths) and convert "
            "that with llama.cpp's convert_hf_to_gguf.py"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"llama.cpp's LLaMA graph uses SiLU; this model uses {config.hidden_act}")
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None):
        raise ExportError("sliding-window attention has no place in llama.cpp's llama/deci architectures")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ExportError(
            f"RoPE scaling {rope.get('rope_type')!r} is not written by this exporter (only none and linear)"
        )


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rope


# --- tensors -----------------------------------------------------------------------------------------------------


def rope_interleave(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (weight or bias) from transformers' rotate-half order to llama.cpp's adjacent pairs: within a
    head of size d, new row 2i + j is old row j * d/2 + i."""
    if n_heads == 0:
        return t
    rest = t.shape[1:]
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(t.shape)


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`t` with zero rows appended up to n rows (dim 0)."""
    if t is None or t.shape[0] == n:
        return t
    pad = t.new_zeros((n - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], 0)


def _cols(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], n - t.shape[1]))], 1)


def _layer_tensors(adapter, layer, widths: LayerWidths, head_dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """GGUF tensor name suffix -> tensor (torch layout: out x in) for one decoder layer."""
    attn = adapter.attention(layer)
    out: dict[str, torch.Tensor] = {}
    if widths.heads:
        out["attn_norm.weight"] = layer.input_layernorm.weight
        if getattr(attn, "minillm_empty", False):  # the zero KV group that carries the output bias
            q_rows, kv_rows = widths.heads * head_dim, widths.kv_heads * head_dim
            zeros = attn.o_proj.weight.new_zeros
            out |= {
                "attn_q.weight": zeros(q_rows, hidden), "attn_k.weight": zeros(kv_rows, hidden),
                "attn_v.weight": zeros(kv_rows, hidden), "attn_output.weight": zeros(hidden, q_rows),
            }
        else:
            q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
            out["attn_q.weight"] = rope_interleave(q.weight, widths.heads)
            out["attn_k.weight"] = rope_interleave(k.weight, widths.kv_heads)
            out["attn_v.weight"] = v.weight
            out["attn_output.weight"] = attn.o_proj.weight
            for name, lin, n in (("attn_q", q, widths.heads), ("attn_k", k, widths.kv_heads), ("attn_v", v, None)):
                if lin.bias is not None:
                    out[f"{name}.bias"] = lin.bias if n is None else rope_interleave(lin.bias, n)
        if attn.o_proj.bias is not None:
            out["attn_output.bias"] = attn.o_proj.bias
    if widths.channels:
        mlp = layer.mlp
        c = widths.channels
        out["ffn_norm.weight"] = layer.post_attention_layernorm.weight
        out["ffn_gate.weight"] = _rows(mlp.gate_proj.weight, c)
        out["ffn_up.weight"] = _rows(mlp.up_proj.weight, c)
        out["ffn_down.weight"] = _cols(mlp.down_proj.weight, c)
        for name, lin in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj)):
            if lin.bias is not None:
                out[f"{name}.bias"] = _rows(lin.bias, c)
        if mlp.down_proj.bias is not None:
            out["ffn_down.bias"] = mlp.down_proj.bias
    return out


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def gguf_tensors(model: nn.Module, widths: list[LayerWidths]) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF by name, in torch layout (the writer reverses the shape)."""
    adapter = get_adapter(model)
    head_dim, hidden = adapter.original_attention.head_dim, adapter.hidden_size
    out = {"token_embd.weight": model.get_input_embeddings().weight, "output_norm.weight": model.model.norm.weight}
    if not _tied(model):
        out["output.weight"] = model.get_output_embeddings().weight
    for i, (layer, w) in enumerate(zip(adapter.layers(), widths)):
        for suffix, t in _layer_tensors(adapter, layer, w, head_dim, hidden).items():
            out[f"blk.{i}.{suffix}"] = t
    return out


def _array(t: torch.Tensor, float_type: str) -> tuple[np.ndarray, object]:
    """numpy data and GGML type of one tensor: 1-D tensors as F32, others in `float_type`."""
    import gguf

    t = t.detach().cpu()
    if t.dim() == 1 or float_type == "f32":
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    dtype, ggml, _ = FLOAT_TYPES[float_type]
    converted = t.to(dtype)
    if not bool(torch.isfinite(converted).all()):
        raise ExportError(f"a weight overflows {float_type} (largest magnitude {float(t.abs().max()):.3g}): use bf16")
    if float_type == "bf16":
        return converted.view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    return converted.numpy(), getattr(gguf.GGMLQuantizationType, ggml)


# --- tokenizer ---------------------------------------------------------------------------------------------------


def _pre_name(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json, where it follows from the pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}

    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if byte_level(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and byte_level(parts[1])
    ):
        return "smollm"
    return None


def tokenizer_metadata(tokenizer, n_vocab: int, pre: str | None = None) -> dict:
    """The tokenizer as GGUF metadata values (see the module docstring). Refuses what llama.cpp would tokenize
    differently: a non-BPE or non-byte-level tokenizer, an unknown pre-tokenizer without `pre`, more tokens than
    embedding rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer; this one has no tokenizer.json form")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, LLaMA 3, Qwen); this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    pre = pre or _pre_name(spec)
    if pre is None:
        raise ExportError(
            "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's "
            f"{(spec.get('pre_tokenizer') or {}).get('type')} pre-tokenizer: give it (tokenizer_pre=..., CLI "
            "--tokenizer-pre; llama.cpp's names are in its llama-vocab.cpp, e.g. llama-bpe, qwen2, smollm)"
        )
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    vocab = dict(model["vocab"])
    added = spec.get("added_tokens", [])
    for a in added:
        vocab[a["content"]] = a["id"]
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_vocab} rows")
    for text, i in vocab.items():
        tokens[i] = text
    for a in added:
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows no token uses
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain, special = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    meta = {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "add_bos": bool(bos is not None and len(special) > len(plain) and special[0] == bos),
        "add_eos": bool(eos is not None and len(special) > len(plain) and special[-1] == eos),
        "ids": {
            "bos": bos, "eos": eos, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        },
        "chat_template": tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None,
    }
    return meta


def _write_tokenizer(writer, meta: dict) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for name, value in meta["ids"].items():
        if value is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[name])(int(value))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# --- file --------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_debris(out: Path) -> None:
    """Temporary files of earlier exports to `out` whose writer died (named .OUT.PID.minillm-tmp)."""
    for tmp in out.parent.glob(f".{out.name}.*{_TMP_SUFFIX}"):
        pid = tmp.name[len(out.name) + 2 : -len(_TMP_SUFFIX)]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def check_output_file(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ExportError(f"{out} is a directory; a GGUF export is one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (CLI --overwrite) to replace it")
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: name the GGUF file with a .gguf suffix")


def _record(src, widths, arch, float_type, pad_to, directory, tokens_meta, original) -> dict:
    adapter = get_adapter(src)
    state = pruning_state(src)
    head_dim, hidden = adapter.original_attention.head_dim, adapter.hidden_size
    stored = sum(
        w.heads * head_dim * hidden * 2 + w.kv_heads * head_dim * hidden * 2 + w.channels * hidden * 3 for w in widths
    )
    pruned = prunable_params(adapter)
    return {
        "format": "gguf",
        "written_by": "minillm.export_gguf",
        "architecture": arch,
        "float_type": float_type,
        "pad_to": pad_to,
        "source": source_record(state, directory),
        "layers": [asdict(w) for w in widths],
        "tokenizer_pre": tokens_meta["pre"],
        "params": {
            "original_prunable": original,
            "pruned_prunable": pruned,
            "stored_prunable_weights": stored,
            "padding_overhead": round(stored / pruned - 1.0, 6) if pruned else None,
            "pruned_total": _params(src),
        },
    }


def export_gguf(
    model_or_dir: nn.Module | str | Path,
    out: str | Path,
    *,
    float_type: str | None = None,
    pad_to: int = DEFAULT_PAD_TO,
    tokenizer=None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `out` (a .gguf file) from a pruned LLaMA-family model or a directory written by `save_pruned`:
    architecture `llama` for uniform widths, `deci` with per-layer arrays otherwise (module docstring).
    `float_type`: f32, f16 or bf16 (default: the model's dtype). Written atomically; returns the record that is also
    stored in the file's metadata under `minillm.export`."""
    import gguf

    out = Path(out)
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive integer, got {pad_to!r}")
    if float_type is not None and float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    check_output_file(out, overwrite)
    src, tok, directory = _source(model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else tok
    if tokenizer is None:
        raise ExportError(
            "GGUF stores the tokenizer and this model has none: save the pruned model with its tokenizer "
            "(save_pruned(..., tokenizer=tok)) or pass export_gguf(..., tokenizer=tok)"
        )
    _check_model(src)
    if float_type is None:
        float_type = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(src.dtype, "f32")
    adapter = get_adapter(src)
    config = src.config
    widths = plan_widths(src, pad_to)
    uniform = len(set(widths)) == 1 and widths[0].heads > 0 and widths[0].channels > 0
    arch = "llama" if uniform else "deci"
    head_dim = adapter.original_attention.head_dim
    meta = tokenizer_metadata(tokenizer, int(src.get_input_embeddings().weight.shape[0]), tokenizer_pre)
    state = pruning_state(src).track(adapter)
    original = (state.plan.prunable_params_original if state.plan else None) or state.original_params
    record = _record(src, widths, arch, float_type, pad_to, directory, meta, original)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}{_TMP_SUFFIX}"
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(f"{Path(str(record['source']['base_model'] or 'model')).name} pruned by minillm")
        writer.add_block_count(len(widths))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(adapter.hidden_size)
        if uniform:
            writer.add_feed_forward_length(widths[0].channels)
            writer.add_head_count(widths[0].heads)
            writer.add_head_count_kv(widths[0].kv_heads)
        else:
            writer.add_feed_forward_length([w.channels for w in widths])
            writer.add_head_count([w.heads for w in widths])
            writer.add_head_count_kv([w.kv_heads for w in widths])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = _rope(config)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(len(meta["tokens"]))
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FLOAT_TYPES[float_type][2])))
        _write_tokenizer(writer, meta)
        writer.add_string(RECORD_KEY, json.dumps(record, sort_keys=True))
        with torch.no_grad():
            for name, t in gguf_tensors(src, widths).items():
                data, ggml = _array(t, float_type)
                writer.add_tensor(name, data, raw_dtype=ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    check_gguf(out, record)
    return record


def read_gguf(path: str | Path) -> dict:
    """What a GGUF file says, read back with `gguf`'s reader: architecture, per-layer widths, tensor shapes (GGUF
    order), tokenizer fields, and minillm's record."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    n_layer = value(f"{arch}.block_count")

    def per_layer(key):
        v = value(f"{arch}.{key}")
        return list(v) if isinstance(v, list) else [v] * n_layer

    record = value(RECORD_KEY)
    return {
        "architecture": arch,
        "block_count": n_layer,
        "head_count": per_layer("attention.head_count"),
        "head_count_kv": per_layer("attention.head_count_kv"),
        "feed_forward_length": per_layer("feed_forward_length"),
        "key_length": value(f"{arch}.attention.key_length"),
        "tensors": {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors},
        "tokenizer": {
            "model": value("tokenizer.ggml.model"),
            "pre": value("tokenizer.ggml.pre"),
            "n_tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
            "n_merges": len(reader.fields["tokenizer.ggml.merges"].data),
            "bos": value("tokenizer.ggml.bos_token_id"),
            "eos": value("tokenizer.ggml.eos_token_id"),
        },
        "record": json.loads(record) if record else None,
    }


def check_gguf(path: str | Path, record: dict) -> None:
    """Read the written file back and check its per-layer widths and tensor shapes against the record."""
    info = read_gguf(path)
    layers = [LayerWidths(**w) for w in record["layers"]]
    problems = []
    if info["architecture"] != record["architecture"]:
        problems.append(f"architecture {info['architecture']}")
    if [w.heads for w in layers] != info["head_count"] or [w.kv_heads for w in layers] != info["head_count_kv"]:
        problems.append("head counts")
    if [w.channels for w in layers] != info["feed_forward_length"]:
        problems.append("feed-forward lengths")
    d = info["key_length"]
    for i, w in enumerate(layers):
        q = info["tensors"].get(f"blk.{i}.attn_q.weight")
        if (q[0][1] if q else 0) != w.heads * d:
            problems.append(f"layer {i} q shape {q}")
        down = info["tensors"].get(f"blk.{i}.ffn_down.weight")
        if (down[0][0] if down else 0) != w.channels:
            problems.append(f"layer {i} down shape {down}")
    if problems:
        raise ExportError(f"{path} does not read back as written: {'; '.join(problems)}")


__all__ = ["export_gguf", "read_gguf", "plan_widths", "rope_interleave", "tokenizer_metadata"]
