"""Output architectures of an MoE: which dense models they take, their config, and where each
expert's MLP and each router go.

The tensor names are the per-expert layout that transformers' ``save_pretrained`` writes for
Mixtral (``block_sparse_moe.experts.N.w1/w2/w3`` and ``block_sparse_moe.gate``): transformers 5
loads it through its conversion mapping into fused expert tensors, and 4.x loads it as it is.
Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mergeforge.errors import CheckpointError, RecipeError

MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class MoEArchitecture:
    """One output architecture."""

    name: str
    model_type: str  # the output config's model_type
    class_name: str  # its transformers class
    dense_types: tuple[str, ...]  # the dense model types it is built from
    expert_names: dict[str, str]  # dense MLP projection -> the expert's tensor (with {layer} and {expert})
    router_name: str  # with {layer}
    experts_key: str  # the config field that holds the number of experts
    fixed: dict[str, Any] = field(default_factory=dict)  # config fields the MoE sets whatever the dense config says
    intermediate_key: str | None = None  # a config field that takes the dense intermediate_size (the experts' width)
    shared_expert: bool = False

    def expert_tensor(self, layer: int, expert: int, projection: str) -> str:
        return self.expert_names[projection].format(layer=layer, expert=expert)

    def router_tensor(self, layer: int) -> str:
        return self.router_name.format(layer=layer)

    def output_config(self, dense_config: dict[str, Any], experts: int, experts_per_token: int, torch_dtype: str) -> dict[str, Any]:
        """config.json of the MoE: the dense config's shared fields, and the MoE's own."""
        from transformers import AutoConfig

        for flag in ("attention_bias", "mlp_bias"):
            if dense_config.get(flag):
                raise CheckpointError(f"base model: {flag} is true, and {self.name} has no biases there; "
                                      "its MoE cannot hold these weights")
        fields = {k: v for k, v in dense_config.items()
                  if k not in ("model_type", "architectures", "auto_map", "transformers_version", "attention_bias", "mlp_bias",
                               "pretraining_tp", "dtype", "torch_dtype", "_name_or_path")}
        config = AutoConfig.for_model(self.model_type, **fields)
        config.architectures = [self.class_name]
        setattr(config, self.experts_key, experts)
        config.num_experts_per_tok = experts_per_token
        config.output_router_logits = False
        for key, value in self.fixed.items():
            setattr(config, key, value)
        if self.intermediate_key is not None:
            setattr(config, self.intermediate_key, dense_config["intermediate_size"])
        data: dict[str, Any] = config.to_dict()
        data["torch_dtype" if "torch_dtype" in dense_config else "dtype"] = torch_dtype
        return data


MIXTRAL = MoEArchitecture(
    name="Mixtral",
    model_type="mixtral",
    class_name="MixtralForCausalLM",
    dense_types=("llama", "mistral"),
    expert_names={
        "gate_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "down_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
        "up_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    },
    router_name="model.layers.{layer}.block_sparse_moe.gate.weight",
    experts_key="num_local_experts",
    fixed={"sliding_window": None, "router_jitter_noise": 0.0},
)

# mergekit-moe's qwen3 output: the experts under mlp.experts.N, the router at mlp.gate, every
# layer sparse, top-k weights renormalised (so an MoE of copies is the dense model).
QWEN3_MOE = MoEArchitecture(
    name="Qwen3-MoE",
    model_type="qwen3_moe",
    class_name="Qwen3MoeForCausalLM",
    dense_types=("qwen3",),
    expert_names={projection: f"model.layers.{{layer}}.mlp.experts.{{expert}}.{projection}.weight"
                  for projection in ("gate_proj", "up_proj", "down_proj")},
    router_name="model.layers.{layer}.mlp.gate.weight",
    experts_key="num_experts",
    fixed={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []},
    intermediate_key="moe_intermediate_size",
)

ARCHITECTURES = (MIXTRAL, QWEN3_MOE)


def choose_architecture(requested: str | None, model_type: str, shared_experts: int, source: str) -> MoEArchitecture:
    """The output architecture: ``requested`` (a prefix of a name, as mergekit matches it), else
    the first that takes ``model_type``; an error names what is possible."""
    names = ", ".join(a.name for a in ARCHITECTURES)
    candidates = [a for a in ARCHITECTURES if requested is None or a.name.lower().startswith(requested.lower())]
    if not candidates:
        raise RecipeError(f"{source}: field 'architecture': no output architecture '{requested}'; available: {names} "
                          "(the Qwen2-MoE output is not built yet)")
    fitting = [a for a in candidates if model_type in a.dense_types]
    if not fitting:
        takes = "; ".join(f"{a.name} takes {', '.join(a.dense_types)}" for a in candidates)
        raise CheckpointError(f"{source}: the models are '{model_type}' models; {takes}")
    chosen = fitting[0]
    if shared_experts and not chosen.shared_expert:
        raise RecipeError(f"{source}: field 'shared_experts': {chosen.name} has no shared expert (Qwen2-MoE has one, "
                          "and is not built yet); remove shared_experts")
    return chosen
