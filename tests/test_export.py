"""Export to the stock transformers form (`minillm.export_pretrained`, `minillm export`): the export loads with the
stock class in a Python that cannot import minillm, with the logits of `load_pruned`; narrower layers are zero-padded
(whole KV groups, BLOOM heads at their original indices); biases go through the config's flags or are refused; the
record and the model card give the padding overhead; PEFT attaches to the export."""

import json
import subprocess
import sys
import sysconfig

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minillm
from minillm.__main__ import main
from minillm.export import CARD_FILE, RECORD_FILE, ExportError
from minillm.files import MANIFEST, OutputDirError
from minillm.models import SHAPES
from minillm.surgery import CurrentKeep

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CASES = [(name, alloc) for name in TINY for alloc in ("uniform", "global")] + [("tiny-llama-gqa", "dense")]
COMPACT = ("tiny-llama", "tiny-llama-gqa", "tiny-llama-mqa", "tiny-gemma3")  # families with an explicit head_dim

# Runs in `python -I -S`: no site processing, so the editable install's finder (a .pth file) is not installed and
# minillm cannot be imported; site-packages is appended by hand for torch and transformers.
STOCK = r"""
import importlib.util, sys
sys.path += sys.argv[1].split("\n")
assert importlib.util.find_spec("minillm") is None, "minillm is importable in the stock interpreter"
import torch
from transformers import AutoModelForCausalLM
tokens, out = torch.load(sys.argv[2]), {}
for directory in sys.argv[4:]:
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model).__module__.startswith("transformers.models."), type(model).__module__
    with torch.no_grad():
        out[directory] = model(tokens).logits
assert not any(m.startswith("minillm") for m in sys.modules)
torch.save(out, sys.argv[3])
"""


def _calib():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def _prune(name: str, alloc: str):
    """'uniform' / 'global': random scores; 'dense': wanda_sp, uniform, with the centred refit (o_proj and down_proj
    biases in every layer)."""
    model, _ = minillm.load_model(name)
    if alloc == "dense":
        plan = minillm.prune(model, "wanda_sp", 0.4, _calib(), reconstruct="dense", progress=False)
    else:
        plan = minillm.prune(model, "random", 0.4, allocation=alloc, seed=3, progress=False)
    return model, plan


def stock_logits(directories, tmp_path) -> dict:
    """Logits of each export loaded by the stock class in a Python without minillm (one subprocess for all)."""
    paths = sysconfig.get_paths()
    site = "\n".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    torch.save(TOKENS, tmp_path / "tokens.pt")
    cmd = [sys.executable, "-I", "-S", "-c", STOCK, site, str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""}
    run = subprocess.run(
        [*cmd, *map(str, directories)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case pruned, saved, exported: (record, load_pruned logits, stock logits, export directory)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, alloc in CASES:
        model, plan = _prune(name, alloc)
        minillm.save_pruned(model, plan, root / f"{name}-{alloc}")
        record = minillm.export_pretrained(root / f"{name}-{alloc}", root / f"{name}-{alloc}-hf")
        reloaded, _ = minillm.load_pruned(root / f"{name}-{alloc}")
        with torch.no_grad():
            out[name, alloc] = (record, reloaded(TOKENS).logits, root / f"{name}-{alloc}-hf")
    stock = stock_logits([d for _, _, d in out.values()], root)
    return {key: (rec, ref, stock[str(d)], d) for key, (rec, ref, d) in out.items()}


@pytest.mark.parametrize("name,alloc", CASES)
def test_stock_class_without_minillm_gives_the_logits_of_load_pruned(exported, name, alloc):
    record, ref, stock, _ = exported[name, alloc]
    assert (stock - ref).abs().max() <= 1e-5
    assert record["verification"]["max_abs_logit_difference"] <= 1e-5


@pytest.mark.parametrize("name", COMPACT)
def test_uniform_widths_give_the_smaller_stock_config_without_padding(exported, name):
    record, _, _, directory = exported[name, "uniform"]
    config = json.loads((directory / "config.json").read_text())
    width = record["pruned_widths"][0]
    assert all(w == width for w in record["pruned_widths"])
    assert config["num_attention_heads"] == width["query_heads"] and config["num_key_value_heads"] == width["kv_heads"]
    assert config["intermediate_size"] == width["channels"]
    assert config["head_dim"] == SHAPES[name]().head_dim  # explicit: hidden_size / heads would change it
    assert record["params"]["padding"] == 0 and not record["padded"] and record["notes"] == []


@pytest.mark.parametrize("name", TINY)
def test_per_layer_widths_are_padded_to_the_widest_layer(exported, name):
    record, _, _, directory = exported[name, "global"]
    widths, stock = record["pruned_widths"], record["stock_widths"]
    assert len({tuple(w.values()) for w in widths}) > 1  # the case exercises padding
    assert stock["intermediate_size"] >= max(w["channels"] for w in widths)
    assert stock["num_query_heads"] >= max(w["query_heads"] for w in widths)
    p = record["params"]
    assert p["stored_prunable"] - p["pruned_prunable"] == p["padding"] > 0
    assert p["padding_overhead"] == pytest.approx(p["padding"] / p["pruned_prunable"], abs=1e-6)
    card = (directory / CARD_FILE).read_text()
    assert str(p["stored_prunable"]) in card and str(p["pruned_prunable"]) in card and "zero padding" in card
    assert json.loads((directory / RECORD_FILE).read_text()) == record
    written = {MANIFEST, "config.json", "model.safetensors", RECORD_FILE, CARD_FILE}
    assert written <= {x.name for x in directory.iterdir()}


def test_mqa_pads_query_heads_within_the_group(exported):
    record, _, _, directory = exported["tiny-llama-mqa", "global"]
    assert record["stock_widths"]["num_kv_heads"] == 1
    weights = load_file(str(directory / "model.safetensors"))
    for i, w in enumerate(record["pruned_widths"]):
        o = weights[f"model.layers.{i}.self_attn.o_proj.weight"]
        heads = o.reshape(o.shape[0], -1, 8).abs().sum(dim=(0, 2)) > 0
        assert int(heads.sum()) == w["query_heads"]  # padded heads have zero o_proj columns


def test_gqa_pads_whole_kv_groups_and_an_emptied_layer_stays_empty(tmp_path):
    """tiny-llama-gqa (6 query heads in 2 KV groups of 3, head_dim 8): layer 0 keeps group 1 only, layer 1 both,
    layer 2 neither, nor any MLP channel; the export holds 2 groups everywhere, group 1 of layer 0 moved to slot 0."""
    model, _ = minillm.load_model("tiny-llama-gqa")
    keeps = [
        CurrentKeep([3, 4, 5], [1], list(range(64))),
        CurrentKeep(list(range(6)), [0, 1], list(range(40))),
        CurrentKeep([], [], []),
    ]
    minillm.remove_units(model, keeps, progress=False)
    record = minillm.export_pretrained(model, tmp_path / "hf")
    assert (record["stock_widths"]["num_query_heads"], record["stock_widths"]["num_kv_heads"]) == (6, 2)
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    layer0 = {n: weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkvo"}
    for name, zero in (("q", slice(24, 48)), ("k", slice(8, 16)), ("v", slice(8, 16))):
        assert torch.count_nonzero(layer0[name][zero]) == 0 and torch.count_nonzero(layer0[name][: zero.start]) > 0
    assert torch.count_nonzero(layer0["o"][:, 24:]) == 0
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert torch.count_nonzero(weights[f"model.layers.2.{name}.weight"]) == 0
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(TOKENS).logits
        assert (stock - model(TOKENS).logits).abs().max() <= 1e-5


def test_opt_and_bloom_keep_the_original_head_count_with_heads_at_their_original_indices(exported, tmp_path):
    record, _, _, directory = exported["tiny-bloom", "global"]
    assert record["stock_widths"]["num_query_heads"] == 4 and record["stock_widths"]["intermediate_size"] == 128
    assert record["params"]["stored_prunable"] == record["params"]["original_prunable"]
    assert any("saves no memory" in n for n in record["notes"])
    plan = minillm.PruningPlan.load(directory.parent / "tiny-bloom-global" / "pruning.json")
    weights = load_file(str(directory / "model.safetensors"))
    for i, keep in enumerate(plan.layers):
        dense = weights[f"transformer.h.{i}.self_attention.dense.weight"]
        live = (dense.reshape(dense.shape[0], 4, 8).abs().sum(dim=(0, 2)) > 0).nonzero().flatten().tolist()
        assert live == keep.kept_query_heads  # ALiBi slope of head h stays h's
    opt, _, _, _ = exported["tiny-opt", "uniform"]
    assert opt["stock_widths"]["num_query_heads"] == 4 and opt["padded"]  # head_dim = hidden / heads
    assert opt["stock_widths"]["intermediate_size"] == opt["pruned_widths"][0]["channels"]


def test_refit_biases_turn_on_attention_bias_and_mlp_bias_with_zero_qkv_gate_up_biases(exported):
    record, _, _, directory = exported["tiny-llama-gqa", "dense"]
    config = json.loads((directory / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    weights = load_file(str(directory / "model.safetensors"))
    for i in range(3):
        assert weights[f"model.layers.{i}.self_attn.o_proj.bias"].abs().sum() > 0
        assert weights[f"model.layers.{i}.mlp.down_proj.bias"].abs().sum() > 0
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert torch.count_nonzero(weights[f"model.layers.{i}.{name}.bias"]) == 0


def test_a_bias_the_stock_class_cannot_hold_is_refused_naming_the_option(tmp_path):
    model, _ = minillm.load_model("tiny-gemma3")
    minillm.prune(model, "wanda_sp", 0.4, _calib(), reconstruct="dense", progress=False)
    with pytest.raises(ExportError, match=r"down_proj\.bias.*reconstruct_form='uncentered'.*compensate_bias") as e:
        minillm.export_pretrained(model, tmp_path / "out")
    assert "Gemma3ForCausalLM" in str(e.value)
    assert not (tmp_path / "out").exists()
    uncentered, _ = minillm.load_model("tiny-gemma3")
    minillm.prune(uncentered, "wanda_sp", 0.4, _calib(), reconstruct="dense", reconstruct_form="uncentered",
                  progress=False)
    minillm.export_pretrained(uncentered, tmp_path / "out")
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(TOKENS).logits
        assert (stock - uncentered(TOKENS).logits).abs().max() <= 1e-5


def test_pad_to_rounds_the_mlp_width_but_not_beyond_the_original(tmp_path):
    model, _ = _prune("tiny-llama", "global")
    with torch.no_grad():
        ref = model(TOKENS).logits
    widest = max(len(k.kept_channels) for k in minillm.pruning_state(model).kept)
    for pad_to, expected in ((8, -(-widest // 8) * 8), (64, 48)):
        record = minillm.export_pretrained(model, tmp_path / f"p{pad_to}", pad_to=pad_to)
        assert record["stock_widths"]["intermediate_size"] == expected and record["pad_to"] == pad_to
        with torch.no_grad():
            stock = AutoModelForCausalLM.from_pretrained(tmp_path / f"p{pad_to}")(TOKENS).logits
        assert (stock - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="pad_to must be a positive integer"):
        minillm.export_pretrained(model, tmp_path / "bad", pad_to=0)


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-gemma3"])
def test_peft_lora_attaches_to_the_export(exported, name):
    from peft import LoraConfig, get_peft_model

    _, ref, _, directory = exported[name, "global"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert lora.get_nb_trainable_parameters()[0] > 0
    out = lora(TOKENS, labels=TOKENS)
    out.loss.backward()
    assert (out.logits.detach() - ref).abs().max() <= 1e-5  # LoRA's B starts at zero


def test_cli_export_writes_the_stock_directory_and_refuses_its_input(tmp_path, capsys):
    model, plan = _prune("tiny-llama-mqa", "global")
    minillm.save_pruned(model, plan, tmp_path / "p")
    assert main(["export", str(tmp_path / "p"), "--format", "hf", "--out", str(tmp_path / "hf"), "--pad-to", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["intermediate_size"] % 8 == 0 and summary["padding_overhead"] > 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["intermediate_size"] == summary["intermediate_size"]
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "hf")]) == 0  # a previous export is replaced
    with pytest.raises(OutputDirError, match="input model directory"):
        minillm.export_pretrained(tmp_path / "p", tmp_path / "p" / "hf")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not written by minillm"):
        minillm.export_pretrained(tmp_path / "p", tmp_path / "foreign")


LM_EVAL_HF = r"""
import importlib.util, json, sys
sys.path += sys.argv[1].split("\n")
assert importlib.util.find_spec("minillm") is None, "minillm is importable in the stock interpreter"
import lm_eval
from lm_eval.tasks import TaskManager
directory, folder, tasks, limit = sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
res = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={directory},device=cpu,dtype=float32,batch_size=4", tasks=tasks,
    task_manager=TaskManager(include_path=folder, include_defaults=False), limit=limit, num_fewshot=0,
    bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    fewshot_random_seed=0,
)
print(json.dumps({t: res["results"][t] for t in tasks}))
"""


def test_lm_eval_hf_model_on_the_export_reproduces_minillm_zero_shot(tmp_path, tiny_text_model_dir):
    """lm-eval's own `hf` model, given only the export's path in a Python that cannot import minillm, scores the
    bundled tasks as minillm.zeroshot scores the pruned model (same accuracies on the same examples)."""
    from minillm.evaluate import load_task_specs, write_task_dir, zeroshot

    model, tok = minillm.load_model(tiny_text_model_dir)
    calib = torch.randint(0, len(tok), (8, 16), generator=torch.Generator().manual_seed(0))
    plan = minillm.prune(model, "wanda_sp", 0.4, calib, allocation="global", progress=False)
    minillm.save_pruned(model, plan, tmp_path / "pruned", tokenizer=tok)
    minillm.export_pretrained(tmp_path / "pruned", tmp_path / "hf")
    tasks, limit = ["bb_cloze_strategyqa", "bb_cloze_wikihow_goal"], 8
    specs = {s["task"]: s for s in load_task_specs()}
    folder = write_task_dir(tmp_path / "tasks", [specs[t] for t in tasks])
    pruned, ptok = minillm.load_pruned(tmp_path / "pruned")
    ours = zeroshot(pruned, ptok, tasks=tasks, limit=limit, batch_size=4, scorer="hflm")
    paths = sysconfig.get_paths()
    site = "\n".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": "", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-I", "-S", "-c", LM_EVAL_HF, site, str(tmp_path / "hf"), str(folder), ",".join(tasks)]
    run = subprocess.run([*cmd, str(limit)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    stock = json.loads(run.stdout.strip().splitlines()[-1])
    for t in tasks:
        metric = specs[t]["metric"]
        assert stock[t][f"{metric},none"] == pytest.approx(ours[t]["value"], abs=1e-9), t
        assert ours[t]["n"] == limit
