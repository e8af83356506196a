"""Export a pruned model to a directory that the stock transformers class loads with nothing but transformers
(`AutoModelForCausalLM.from_pretrained(OUT)`): for vLLM, lm-eval's `hf` model, PEFT, `convert_hf_to_gguf.py` and
anyone without minillm.

`save_pruned` keeps the original config and rebuilds per-layer widths from `pruning.json`; no stock class reads
per-layer widths (see docs/methods.md, "Export"). The export therefore gives every layer the same widths, those of the
widest layer of each kind, by padding narrower layers with zeros:

* rows of the input projections (q/k/v, gate/up, fc1, BLOOM's fused query_key_value) and their biases are zero for
  a padded unit, and so are the columns of the output projections (o_proj, down_proj, fc2, dense). A padded MLP
  channel computes act(0) * 0 and adds nothing; a padded head's output meets zero o_proj columns and adds nothing
  (a head padded inside a kept KV group attends to real values, which is why its o_proj columns must be zero).
* grouped-query attention is padded by whole KV groups (zero k/v rows, group-size zero q rows, zero o columns) and,
  where layers keep different numbers of query heads per group (MQA pruned by query heads), by zero query heads
  inside each group.
* the head dimension never changes. LLaMA-family and Gemma 3 configs take an explicit `head_dim`, so their head
  counts shrink to the widest layer's (or the next count the config class accepts: transformers 5 wants
  hidden_size to be a multiple of the query-head count). OPT and BLOOM derive it as hidden_size / heads, so their
  attention keeps the original head count with every head at its original index (BLOOM's ALiBi slopes are per
  index); BLOOM's MLP is fixed at 4 x hidden_size too, so its export stores the original size.

Models with uniform widths lose nothing; otherwise the export stores more than the pruned model and records by how
much (`minillm_export.json`, README.md). The compact, lossless form remains `save_pruned` + `load_pruned`.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .checkpoint import load_pruned, notice_files
from .files import atomic_directory, check_output_dir, write_json_atomic
from .state import pruning_state
from .surgery import prunable_params

RECORD_FILE = "minillm_export.json"
CARD_FILE = "README.md"
VERIFY_TOKENS = 16


class ExportError(ValueError):
    """A model that the stock class of its family cannot hold."""


@dataclass(frozen=True)
class StockForm:
    """What a family's stock config can express. heads: 'compact' (the config takes head counts and an explicit
    head_dim) or 'original' (head_dim = hidden_size / heads: the original count, heads at their original indices).
    head_fields: config names of the query and KV head counts (None: MHA, one count). channels_field: the MLP width
    (None: fixed by the class). bias_flags: per block ('attention', 'mlp'), the config flag that gives every linear
    of the block a bias (None: the class has none there)."""

    heads: str
    head_fields: tuple[str, str | None]
    channels_field: str | None
    bias_flags: dict[str, str | None] = field(default_factory=dict)


FORMS = {
    "llama": StockForm(
        "compact", ("num_attention_heads", "num_key_value_heads"), "intermediate_size",
        {"attention": "attention_bias", "mlp": "mlp_bias"},
    ),
    "gemma3": StockForm(
        "compact", ("num_attention_heads", "num_key_value_heads"), "intermediate_size",
        {"attention": "attention_bias", "mlp": None},
    ),
    "opt": StockForm(
        "original", ("num_attention_heads", None), "ffn_dim", {"attention": "enable_bias", "mlp": "enable_bias"}
    ),
    "bloom": StockForm("original", ("n_head", None), None, {}),
}


@dataclass
class Layout:
    """The export's widths (n_query_heads, n_kv_heads, channels) and, per layer, the slot in the export of every
    current query head, KV head and channel of the pruned layer."""

    n_query_heads: int
    n_kv_heads: int
    channels: int
    slots: list[dict[str, list[int]]]

    def n_units(self, unit: str) -> int:
        return {"query": self.n_query_heads, "kv": self.n_kv_heads, "channel": self.channels}[unit]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _widths(adapter: Adapter) -> list[dict[str, int]]:
    out = []
    for layer in adapter.layers():
        shape = adapter.attention_shape(layer)
        channels = adapter.n_channels(layer)
        out.append({"query_heads": shape.n_query_heads, "kv_heads": shape.n_kv_heads, "channels": channels})
    return out


def _head_candidates(widths: list[dict], n_original: int) -> list[tuple[int, int]]:
    """(KV heads, query heads per KV head) pairs that hold every layer's heads, cheapest first: a query head costs
    its q rows and o columns, a KV head its k and v rows, about the same. At least one (zero) head, so that a model
    whose attention was removed everywhere still has a valid config. The original layout is always among them."""
    need_kv = max([w["kv_heads"] for w in widths] + [1])
    need_group = max([w["query_heads"] // w["kv_heads"] for w in widths if w["kv_heads"]] + [1])
    pairs = [(kv, g) for kv in range(need_kv, n_original + 1) for g in range(need_group, n_original // kv + 1)]
    return sorted(pairs, key=lambda p: (p[0] * p[1] + p[0], p[0] * p[1]))


def _compact_slots(widths: list[dict], group: int) -> list[dict]:
    """KV head j goes to slot j; query head h of a layer with g heads per group to slot (h // g) * group + h % g, so
    that it stays in its KV head's group; the slots in between are zero heads."""
    slots = []
    for w in widths:
        g = w["query_heads"] // w["kv_heads"] if w["kv_heads"] else 1
        query = [(h // g) * group + h % g for h in range(w["query_heads"])]
        slots.append({"query": query, "kv": list(range(w["kv_heads"]))})
    return slots


def _accepted(config) -> bool:
    """Whether the config class accepts the config: transformers 5's LLaMA and Gemma 3 configs require hidden_size
    to be a multiple of the query-head count even with an explicit head_dim, and refuse to save or load otherwise."""
    validate = getattr(config, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception:  # huggingface_hub's StrictDataclassError (not a ValueError), or a ValueError in older versions
        return False
    return True


def _compact_heads(adapter: Adapter, form: StockForm, widths: list[dict], channels: int) -> tuple[int, int, list]:
    """The cheapest head layout holding every layer that the config class accepts."""
    head_dim = adapter.original_attention.head_dim
    for n_kv, group in _head_candidates(widths, adapter.original_attention.n_query_heads):
        layout = Layout(n_kv * group, n_kv, channels, [])
        if _accepted(_resized_config(adapter.model, form, layout, head_dim)):
            return n_kv * group, n_kv, _compact_slots(widths, group)
    raise ExportError(f"no head count that the stock {type(adapter.config).__name__} accepts holds every layer")


def _original_heads(adapter: Adapter, widths: list[dict]) -> tuple[int, int, list[dict]]:
    """The original head count with every kept head at its original index (head_dim derived from the count; BLOOM's
    ALiBi slope of a head is its index's)."""
    kept = pruning_state(adapter.model).track(adapter).kept
    slots = []
    for i, (w, k) in enumerate(zip(widths, kept)):
        if len(k.kept_query_heads) != w["query_heads"]:
            raise ExportError(
                f"layer {i} has {w['query_heads']} heads but its pruning record lists {len(k.kept_query_heads)}: "
                "the model was cut without minillm's bookkeeping (prune it with minillm.prune or remove_units)"
            )
        slots.append({"query": list(k.kept_query_heads), "kv": list(k.kept_query_heads)})
    n = adapter.original_attention.n_query_heads
    return n, n, slots


def plan_layout(adapter: Adapter, form: StockForm, pad_to: int = 1) -> Layout:
    """Widths of the export: per kind the widest layer's; the MLP width rounded up to a multiple of `pad_to` (never
    beyond the original width); head counts are not rounded (a head is head_dim rows already), but raised where the
    config class refuses a count (see `_accepted`)."""
    widths = _widths(adapter)
    original = adapter.original_channels
    if form.channels_field is None:
        channels = original
    else:
        channels = min(_round_up(max(w["channels"] for w in widths), pad_to), original)
    if form.heads == "compact":
        n_q, n_kv, slots = _compact_heads(adapter, form, widths, channels)
    else:
        n_q, n_kv, slots = _original_heads(adapter, widths)
    for s, w in zip(slots, widths):
        s["channel"] = list(range(w["channels"]))
    return Layout(n_q, n_kv, channels, slots)


def _resized_config(model: nn.Module, form: StockForm, layout: Layout, head_dim: int):
    config = copy.deepcopy(model.config)
    q_field, kv_field = form.head_fields
    setattr(config, q_field, layout.n_query_heads)
    if kv_field:
        setattr(config, kv_field, layout.n_kv_heads)
    if form.heads == "compact":
        config.head_dim = head_dim  # hidden_size / heads would change it
    if form.channels_field:
        setattr(config, form.channels_field, layout.channels)
    return config


def _build(config, device: str = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def _member_blocks(model: nn.Module, adapter: Adapter) -> dict[str, str]:
    """Parameter name -> 'attention' or 'mlp' for every linear of the decoder layers."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in adapter.layers():
        for block, members in (("attention", adapter.attention_members(layer)), ("mlp", adapter.mlp_members(layer))):
            for m in members:
                for p in ("weight", "bias"):
                    out[f"{names[id(m.linear)]}.{p}"] = block
    return out


def _bias_refusal(model: nn.Module, missing: list[str]) -> ExportError:
    return ExportError(
        f"the stock {type(model).__name__} has no place for {len(missing)} bias(es) of this model "
        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): they were added by the centred "
        "least-squares refit or by FLAP's bias compensation. Prune with reconstruct_form='uncentered' "
        "(CLI --reconstruct-form uncentered) and with compensate_bias=False (CLI --no-compensate-bias; flap turns "
        "it on by default) to export this family, or keep the minillm format (minillm.load_pruned)"
    )


def stock_config(model: nn.Module, adapter: Adapter, form: StockForm, layout: Layout):
    """The stock config for the layout, with the bias flags the model's biases need (a flag gives every linear of
    its block a bias; the ones the model lacks are written as zeros). Refuses biases no flag can hold."""
    config = _resized_config(model, form, layout, adapter.original_attention.head_dim)
    blocks = _member_blocks(model, adapter)
    have = {k for k in model.state_dict() if k in blocks and k.endswith(".bias")}
    missing = sorted(have - set(_build(config).state_dict()))
    for block in sorted({blocks[k] for k in missing}):
        flag = form.bias_flags.get(block)
        if flag is not None:
            setattr(config, flag, True)
    if missing:
        missing = sorted(have - set(_build(config).state_dict()))
        if missing:
            raise _bias_refusal(model, missing)
    return config


def _place(dst: nn.Linear, src: nn.Linear, dim: int, slots: list[int], n_units: int) -> None:
    """Copy `src` into the zeroed `dst`, unit i of `src` into slot slots[i] of `dst` along `dim`."""
    block = dst.weight.shape[dim] // n_units if n_units else 0
    index = (torch.tensor(slots, dtype=torch.long)[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    if index.numel():
        dst.weight.index_copy_(dim, index.to(dst.weight.device), src.weight.to(dst.weight))
    if src.bias is None:
        return
    if dim == 0:
        dst.bias.index_copy_(0, index.to(dst.bias.device), src.bias.to(dst.bias))
    else:
        dst.bias.copy_(src.bias)


def _fill(dst: nn.Module, src: nn.Module, layout: Layout) -> None:
    """Every tensor of `dst` from `src`: decoder-layer linears placed into their slots with zeros around them,
    everything else (embeddings, norms, LM head, QK-norms) copied unchanged."""
    src_adapter, dst_adapter = get_adapter(src), get_adapter(dst)
    src_state = src.state_dict()
    blocks = _member_blocks(dst, dst_adapter)
    with torch.no_grad():
        for key, tensor in dst.state_dict().items():
            if key in blocks:
                tensor.zero_()
            elif key not in src_state or src_state[key].shape != tensor.shape:
                found = tuple(src_state[key].shape) if key in src_state else "missing"
                raise ExportError(f"{key}: {tuple(tensor.shape)} in the stock class, {found} in the pruned model")
            else:
                tensor.copy_(src_state[key])
        for i, (ls, ld) in enumerate(zip(src_adapter.layers(), dst_adapter.layers())):
            members = {m.name: m for m in src_adapter.attention_members(ls) + src_adapter.mlp_members(ls)}
            for m in dst_adapter.attention_members(ld) + dst_adapter.mlp_members(ld):
                if m.name in members:  # an emptied attention keeps only its output projection: q/k/v stay zero
                    _place(m.linear, members[m.name].linear, m.dim, layout.slots[i][m.unit], layout.n_units(m.unit))


def _check_shapes(dst: nn.Module, layout: Layout, head_dim: int) -> None:
    """The stock class must have taken the head count and head_dim as given (a config class that derives head_dim
    from hidden_size / heads would build other shapes)."""
    adapter = get_adapter(dst)
    width = adapter.attn_out_proj(adapter.layers()[0]).in_features
    if width != layout.n_query_heads * head_dim:
        raise ExportError(
            f"the stock {type(dst).__name__} builds {width} attention columns for {layout.n_query_heads} heads of "
            f"{head_dim}: its config derives head_dim, so heads cannot be removed in stock form"
        )


def _verify(src: nn.Module, dst: nn.Module) -> float:
    """Largest absolute logit difference between the pruned model and the export on a fixed token sequence; a wrong
    slot gives differences of the order of the logits themselves."""
    vocab = int(src.config.vocab_size)
    tokens = torch.randint(0, vocab, (1, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0))
    was_training = src.training
    src.eval()
    try:
        with torch.no_grad():
            device = next(src.parameters()).device
            a = src(tokens.to(device), use_cache=False).logits.float().cpu()
            b = dst(tokens, use_cache=False).logits.float().cpu()
    finally:
        src.train(was_training)
    diff = float((a - b).abs().max())
    scale = max(1.0, float(a.abs().max()))
    tol = 1e-4 if src.dtype in (torch.float32, torch.float64) else 5e-2
    if not diff <= tol * scale:
        raise ExportError(
            f"the export's logits differ from the pruned model's by {diff:.3g} (tolerance {tol * scale:.3g}): "
            "padding is not exact for this model; please report it"
        )
    return diff


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied pair once


def _overhead(stored: int, pruned: int) -> float | None:
    return round(stored / pruned - 1.0, 6) if pruned else None


def _notes(family: str, form: StockForm, stored: int, original: int | None) -> list[str]:
    notes = []
    if form.heads == "original":
        notes.append(
            f"{family}: the stock class derives head_dim from hidden_size / heads, so attention keeps the original "
            "head count; removed heads are zero at their original indices"
        )
    if form.channels_field is None:
        notes.append(f"{family}: the stock class fixes the MLP width at 4 x hidden_size; removed channels are zeros")
    if original and stored >= original:
        notes.append(
            "this export stores every original parameter (the removed units as zeros): it saves no memory or "
            "compute in stock form; use the minillm format (minillm.load_pruned) for the savings"
        )
    return notes


def source_record(state, directory: Path | None) -> dict:
    """Where an export came from: the pruned directory, the base model, method, sparsity and weights checksum."""
    plan = state.plan
    return {
        "directory": str(directory) if directory else None,
        "base_model": plan.base_model if plan else state.source,
        "method": plan.method if plan else None,
        "sparsity": plan.sparsity if plan else None,
        "weights_sha256": plan.weights_sha256 if plan else None,
    }


def _record(src, dst, form, layout, widths, original, diff, pad_to, directory) -> dict:
    src_adapter, dst_adapter = get_adapter(src), get_adapter(dst)
    pruned, stored = prunable_params(src_adapter), prunable_params(dst_adapter)
    state = pruning_state(src)
    flags = {f: getattr(dst.config, f) for f in sorted({f for f in form.bias_flags.values() if f})}
    return {
        "format": "hf",
        "written_by": "minillm.export_pretrained",
        "load_with": "transformers.AutoModelForCausalLM.from_pretrained(DIR)",
        "source": source_record(state, directory),
        "family": src_adapter.family,
        "architecture": type(dst).__name__,
        "dtype": str(dst.dtype).removeprefix("torch."),
        "stock_widths": {
            "num_query_heads": layout.n_query_heads,
            "num_kv_heads": layout.n_kv_heads,
            "head_dim": src_adapter.original_attention.head_dim,
            "intermediate_size": layout.channels,
            **flags,
        },
        "pad_to": pad_to,
        "padded": stored != pruned,
        "pruned_widths": widths,
        "params": {
            "original_prunable": original,
            "pruned_prunable": pruned,
            "stored_prunable": stored,
            "padding": stored - pruned,
            "padding_overhead": _overhead(stored, pruned),
            "pruned_total": _params(src),
            "stored_total": _params(dst),
            "total_overhead": _overhead(_params(dst), _params(src)),
        },
        "verification": {"tokens": VERIFY_TOKENS if diff is not None else 0, "max_abs_logit_difference": diff},
        "notes": _notes(src_adapter.family, form, stored, original),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _checked(verification: dict) -> str:
    diff = verification["max_abs_logit_difference"]
    if diff is None:
        return "not checked at export"
    return f"max logit difference to the pruned model {diff:.2g} on {verification['tokens']} tokens"


def model_card(record: dict) -> str:
    """README.md of an export: what it is, how to load it, what the padding costs."""
    p, w, src = record["params"], record["stock_widths"], record["source"]
    base = src["base_model"]
    hub = isinstance(base, str) and base.count("/") == 1 and not Path(base).exists()
    front = ["---", "library_name: transformers", "tags:", "- minillm", "- pruned", "- structured-pruning"]
    front += [f"base_model: {base}"] if hub else []
    lines = front + ["---", "", f"# {record['architecture']} pruned with minillm", ""]
    lines += [
        f"Structured pruning ({src['method'] or 'unknown method'}, sparsity {src['sparsity']}) of `{base}`, exported "
        "in the stock transformers form: load it with `AutoModelForCausalLM.from_pretrained(DIR)`, no minillm and no "
        "`trust_remote_code` needed.",
        "",
        f"Every layer has {w['num_query_heads']} query heads, {w['num_kv_heads']} KV heads of dimension "
        f"{w['head_dim']} and an MLP width of {w['intermediate_size']}. Layers pruned narrower are padded with zero "
        f"weights, which leave the outputs unchanged ({_checked(record['verification'])}).",
        "",
        "| decoder-layer linear parameters | count |",
        "|---|---|",
        f"| original | {p['original_prunable'] if p['original_prunable'] is not None else 'n/a'} |",
        f"| pruned (minillm format) | {p['pruned_prunable']} |",
        f"| stored here | {p['stored_prunable']} |",
        f"| zero padding | {p['padding']} ({_pct(p['padding_overhead'])} of the pruned) |",
        "",
        f"All parameters: {p['pruned_total']} pruned, {p['stored_total']} stored ({_pct(p['total_overhead'])} more).",
        "",
    ]
    lines += [f"* {n}" for n in record["notes"]] + ([""] if record["notes"] else [])
    lines += [f"Per-layer widths and the source are in `{RECORD_FILE}`.", ""]
    return "\n".join(lines)


def _source(model_or_dir) -> tuple[nn.Module, object, Path | None]:
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, None, None
    directory = Path(model_or_dir)
    model, tok = load_pruned(directory)
    return model, tok, directory


def export_pretrained(
    model_or_dir: nn.Module | str | Path,
    out: str | Path,
    *,
    pad_to: int = 1,
    tokenizer=None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Write `out`, a directory the stock transformers class loads (`AutoModelForCausalLM.from_pretrained(out)`),
    from a pruned model or a directory written by `save_pruned`. Layers narrower than the widest are padded with
    zeros (see the module docstring); `pad_to` rounds the MLP width up to a multiple (e.g. 64 or 256 for kernels
    and GGUF k-quants; never beyond the original width). `verify` compares the export's logits with the pruned
    model's on a few tokens. Writes the weights, config, tokenizer, licence files, README.md (a model card) and
    minillm_export.json (widths, parameter counts, padding overhead) atomically. Returns that record."""
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive integer, got {pad_to!r}")
    inputs = [] if isinstance(model_or_dir, nn.Module) else [Path(model_or_dir)]
    check_output_dir(Path(out), overwrite, inputs)  # before the work, as every command does
    src, tok, directory = _source(model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else tok
    adapter = get_adapter(src)
    form = FORMS[adapter.family]
    state = pruning_state(src).track(adapter)
    layout = plan_layout(adapter, form, pad_to)
    config = stock_config(src, adapter, form, layout)
    if not _accepted(config):
        raise ExportError(
            f"the stock {type(config).__name__} refuses the exported widths ({layout.n_query_heads} query heads, "
            f"{layout.n_kv_heads} KV heads, MLP {layout.channels})"
        )
    head_dim = adapter.original_attention.head_dim
    dst = _build(config, "cpu", src.dtype)
    _check_shapes(dst, layout, head_dim)
    _fill(dst, src, layout)
    dst.eval()
    diff = _verify(src, dst) if verify else None
    original = (state.plan.prunable_params_original if state.plan else None) or state.original_params
    record = _record(src, dst, form, layout, _widths(adapter), original, diff, pad_to, directory)
    with atomic_directory(Path(out), overwrite=overwrite, inputs=inputs) as tmp:
        dst.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan = state.plan
        for notice in notice_files(src, plan) if plan is not None or state.source else []:
            shutil.copyfile(notice, tmp / notice.name)
        write_json_atomic(tmp / RECORD_FILE, record)
        (tmp / CARD_FILE).write_text(model_card(record))
    return record


__all__ = ["ExportError", "export_pretrained", "model_card", "plan_layout"]

