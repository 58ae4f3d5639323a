"""``model+adapter`` references: a PEFT LoRA applied on the fly while a recipe's model is read
(equal to PEFT's own merge_and_unload), the refusals, and that nothing model-sized is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli

from mergeforge.checkpoint.adapted import AdaptedCheckpoint
from mergeforge.checkpoint.lora_adapter import read_lora
from mergeforge.checkpoint.reader import Checkpoint, open_checkpoint
from mergeforge.engine.api import merge
from mergeforge.errors import CheckpointError, OutputError

peft = pytest.importorskip("peft")


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A real PEFT adapter with random (non-zero) factors; ``bump`` shifts its modules_to_save copies."""
    torch.manual_seed(seed)
    bump = config.pop("bump", 0.0)
    config.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(load(base), peft.LoraConfig(r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8),
                                                             init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(bump)
    model.save_pretrained(folder)
    return folder


def merged_by_peft(base: Path, adapter: Path, folder: Path) -> Path:
    """The reference: PEFT's merge_and_unload of the adapter, saved as a model folder."""
    model = peft.PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(model_factory) -> Path:
    return model_factory("llama", "refs-base", seed=0)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """Everything read_lora honours at once: rsLoRA, rank and alpha patterns, an embedding LoRA
    and a modules_to_save copy of lm_head that differs from the base's."""
    return make_adapter(base, tmp_path_factory.mktemp("refs") / "adapter", 1, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"down_proj": 3.0}, modules_to_save=["lm_head"], bump=0.5)


def test_every_tensor_equals_peft_merge_and_unload(base, adapter, tmp_path):
    expected = load_state(merged_by_peft(base, adapter, tmp_path / "merged"))
    with open_checkpoint(f"{base}+{adapter}") as model:
        assert isinstance(model, AdaptedCheckpoint)
        assert sorted(model.names()) == sorted(expected)
        assert "lm_head.weight" in model.adapted_names() and "model.embed_tokens.weight" in model.adapted_names()
        for name in model.names():
            tensor = model.read(name)
            assert tensor.dtype == expected[name].dtype
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
            if tensor.ndim == 2:  # row blocks, as the torch executor streams them, are rows of the whole
                torch.testing.assert_close(model.read(name, 3, 7), tensor[3:7], rtol=0, atol=1e-5, msg=name)


def recipe_file(path: Path, models: list[str], base: str) -> Path:
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (0.7, 0.4))],
    }))
    return path


def test_recipe_with_adapter_references_equals_the_merge_of_hand_merged_models(model_factory, base, adapter, tmp_path):
    """In a real CLI run, relative to the recipe's folder, as base_model and as a model."""
    finetune = model_factory("llama", "refs-ft", seed=2, base=base)
    plain = make_adapter(base, tmp_path / "plain", 3)
    work = tmp_path / "work"
    work.mkdir()
    for name, folder in (("base", base), ("ft", finetune), ("adapter", adapter), ("plain", plain)):
        (work / name).symlink_to(folder)
    merged_by_peft(base, adapter, work / "base-adapted")
    merged_by_peft(finetune, plain, work / "ft-adapted")
    by_reference = recipe_file(work / "refs.yml", ["ft+plain", "base+adapter"], "base+adapter")
    by_hand = recipe_file(work / "hand.yml", ["ft-adapted", "base-adapted"], "base-adapted")
    for recipe, out in ((by_reference, "out-refs"), (by_hand, "out-hand")):
        result = run_cli("merge", recipe.name, out, "--quiet", cwd=work)
        assert result.returncode == 0, result.stderr
    ours, theirs = load_state(work / "out-refs"), load_state(work / "out-hand")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert not any(p.name.startswith(".") for p in work.iterdir()), "no merged copy or temporary left behind"


def test_slice_sources_take_adapter_references(base, adapter, tmp_path):
    merged_by_peft(base, adapter, tmp_path / "adapted")
    expected = load_state(tmp_path / "adapted")
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": f"{base}+{adapter}", "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(base), "layer_range": [2, 4]}]}]}
    merge(recipe, tmp_path / "out", quiet=True)
    out, original = load_state(tmp_path / "out"), load_state(base)
    torch.testing.assert_close(out["model.layers.1.self_attn.q_proj.weight"], expected["model.layers.1.self_attn.q_proj.weight"],
                               rtol=0, atol=1e-6)
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], original["model.layers.3.self_attn.q_proj.weight"])
    # as in mergekit, the embedding comes from the first slice's model, the head from the last one's
    torch.testing.assert_close(out["model.embed_tokens.weight"], expected["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    assert not torch.equal(expected["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], original["lm_head.weight"])


class RecordingSource(Checkpoint):
    """A model folder that records every read (name, rows) and the bytes it returned."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.reads: list[tuple[str, int, int | None, int]] = []

    def read(self, name, row_start=0, row_stop=None):
        tensor = super().read(name, row_start, row_stop)
        self.reads.append((name, row_start, row_stop, tensor.numel() * tensor.element_size()))
        return tensor


def test_the_wrapper_reads_only_what_is_asked_and_holds_no_model_tensor(base, adapter):
    inner = RecordingSource(base)
    model = AdaptedCheckpoint(inner, read_lora(adapter), "base+adapter")
    name = "model.layers.0.self_attn.q_proj.weight"
    block = model.read(name, 8, 16)
    assert inner.reads == [(name, 8, 16, block.numel() * 4)]
    # a modules_to_save copy, and the embedding PEFT saved with its LoRA: the base's are never read
    model.read("lm_head.weight")
    model.read("model.embed_tokens.weight", 0, 5)
    model.read("model.layers.1.mlp.down_proj.weight")
    model.read("model.norm.weight")
    assert [read[:3] for read in inner.reads[1:]] == [("model.layers.1.mlp.down_proj.weight", 0, None), ("model.norm.weight", 0, None)]
    # what it holds is the adapter (factors and the saved copy), never a tensor of the model
    held = sum(t.numel() * t.element_size() for t in read_lora(adapter).saved.values())
    held += sum((u.up.numel() + u.down.numel()) * 4 for u in model.updates.values())
    model_bytes = sum(info.nbytes for info in inner.tensors.values())
    assert held < model_bytes / 4
    assert not any(isinstance(value, torch.Tensor) for value in vars(model).values())


def test_dry_run_names_the_torch_executor_and_why(base, adapter):
    result = merge({"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}},
                                                          {"model": str(base), "parameters": {"weight": 1.0}}]}, dry_run=True)
    assert result.executor == "torch"
    assert any("has a LoRA applied while it is read" in line for line in result.plan_lines)
    assert any(line.startswith(f"input {base}+{adapter}: safetensors + LoRA") for line in result.plan_lines), result.plan_lines


def test_the_output_may_not_replace_the_adapter(base, adapter):
    with pytest.raises(OutputError, match="input model folder"):
        merge({"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]},
              adapter, overwrite=True, quiet=True)
    assert (adapter / "adapter_config.json").is_file()


def test_bad_references_are_one_message_naming_the_reference(base, adapter, model_factory, tmp_path):
    other = model_factory("qwen2", "refs-qwen2", seed=0)  # 3 layers, tied embeddings
    wide = tmp_path / "wide"
    make_adapter(base, wide, 4)
    from safetensors.torch import load_file, save_file

    state = load_file(wide / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = torch.zeros(40, state[key].shape[1])
    save_file(state, wide / "adapter_model.safetensors")
    dora = tmp_path / "dora"
    make_adapter(base, dora, 5)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    tied = make_adapter(base, tmp_path / "lm-head", 6, target_modules=["lm_head"])
    cases = [
        (f"{base}+{tmp_path / 'missing'}", "adapter folder '"),
        (f"{base}+{wide}", "update of 'model.layers.0.self_attn.q_proj.weight' has shape [40, 32], the model's tensor has [32, 32]"),
        (f"{base}+{dora}", "DoRA"),
        (f"{other}+{adapter}", "which the model does not have"),
        (f"{other}+{tied}", "its embeddings are tied"),
        (f"{base}+{adapter}+{adapter}", "with one '+'"),
    ]
    for ref, message in cases:
        with pytest.raises(CheckpointError, match="^model '") as caught:
            open_checkpoint(ref)
        assert ref in str(caught.value) and message in str(caught.value), (ref, str(caught.value))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": cases[2][0], "parameters": {"weight": 1.0}}]}))
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "DoRA" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_path_with_a_plus_in_its_name_is_a_plain_model(base, tmp_path):
    folder = tmp_path / "model+v2"
    folder.symlink_to(base)
    with open_checkpoint(folder) as model:
        assert isinstance(model, Checkpoint)


def test_data_aware_methods_run_the_adapted_model(base, adapter, tmp_path):
    """Calibration runs the models with transformers: a model+adapter reference runs with the adapter."""
    from mergeforge.engine.calibrate import folder_loader
    from mergeforge.engine.plan import build_plan
    from mergeforge.engine.recipe import load_recipe

    ref = f"{base}+{adapter}"
    recipe = load_recipe({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]})
    expected = load_state(merged_by_peft(base, adapter, tmp_path / "merged"))
    with build_plan(recipe) as plan:
        model = folder_loader(plan)(ref)
    for name, parameter in model.state_dict().items():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-6, msg=name)
