"""Output architectures of an MoE: which dense models they take, their config, and where each
expert's MLP and each router go.

The tensor names are the per-expert layout that transformers' ``save_pretrained`` writes for
Mixtral (``block_sparse_moe.experts.N.w1/w2/w3`` and ``block_sparse_moe.gate``): transformers 5
loads it through its conversion mapping into fused expert tensors, and 4.x loads it as it is.
:meth:`MoEArchitecture.fused` is the other layout: transformers 5's own fused tensors
(``mlp.experts.gate_up_proj`` [E, 2·I, H], the gate projection's rows first, and
``mlp.experts.down_proj`` [E, H, I]), which transformers 5 loads with no conversion and 4.x not at
all. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    intermediate_keys: tuple[str, ...] = ()  # config fields that take the dense intermediate_size (the experts' width)
    # Qwen2-MoE: one shared expert (with {layer}) beside the routed ones, and its sigmoid gate.
    shared_names: dict[str, str] | None = None
    shared_gate_name: str | None = None
    attention_biases: tuple[str, ...] = ()  # attention projections with a bias in this architecture
    fused_layout: bool = False  # the experts as transformers 5's fused tensors (see fused())

    FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
    FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"

    def fused(self) -> MoEArchitecture:
        """This architecture with transformers 5's fused expert tensors, under ``mlp.`` as
        transformers 5 names every one of these blocks (Mixtral's router too)."""
        return replace(self, fused_layout=True, router_name="model.layers.{layer}.mlp.gate.weight")

    @property
    def shared_expert(self) -> bool:
        return self.shared_names is not None

    def shared_tensor(self, layer: int, projection: str) -> str:
        assert self.shared_names is not None
        return self.shared_names[projection].format(layer=layer)

    def expert_tensor(self, layer: int, expert: int, projection: str) -> str:
        return self.expert_names[projection].format(layer=layer, expert=expert)

    def expert_slot(self, expert: int) -> Callable[[int, str], str]:
        """``(layer, projection) -> tensor name`` of one expert (as :meth:`shared_tensor` is for the shared one)."""
        return lambda layer, projection: self.expert_tensor(layer, expert, projection)

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
        for key in self.intermediate_keys:
            setattr(config, key, dense_config["intermediate_size"])
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
    intermediate_keys=("moe_intermediate_size",),
)

# mergekit-moe's qwen output: Qwen3-MoE's layout plus one shared expert (mlp.shared_expert) behind a
# sigmoid gate (mlp.shared_expert_gate), q/k/v biases (zeros where the dense base has none).
QWEN2_MOE = MoEArchitecture(
    name="Qwen2-MoE",
    model_type="qwen2_moe",
    class_name="Qwen2MoeForCausalLM",
    dense_types=("qwen2", "llama", "mistral"),
    expert_names=QWEN3_MOE.expert_names,
    router_name=QWEN3_MOE.router_name,
    experts_key="num_experts",
    fixed={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [], "sliding_window": None,
           "use_sliding_window": False, "qkv_bias": True},
    intermediate_keys=("moe_intermediate_size", "shared_expert_intermediate_size"),
    shared_names={projection: f"model.layers.{{layer}}.mlp.shared_expert.{projection}.weight"
                  for projection in ("gate_proj", "up_proj", "down_proj")},
    shared_gate_name="model.layers.{layer}.mlp.shared_expert_gate.weight",
    attention_biases=("q_proj", "k_proj", "v_proj"),
)

ARCHITECTURES = (MIXTRAL, QWEN3_MOE, QWEN2_MOE)


def choose_architecture(requested: str | None, model_type: str, shared_experts: int, source: str) -> MoEArchitecture:
    """The output architecture: ``requested`` (a prefix of a name, as mergekit matches it), else
    the first that takes ``model_type`` (one with a shared expert when ``shared_experts`` are
    given, else one without); an error names what is possible."""
    names = ", ".join(a.name for a in ARCHITECTURES)
    key = (requested or "").lower().replace("-", "").replace("_", "")
    candidates = [a for a in ARCHITECTURES if a.name.lower().replace("-", "").startswith(key)]
    if not candidates:
        raise RecipeError(f"{source}: field 'architecture': no output architecture '{requested}'; available: {names}")
    fitting = [a for a in candidates if model_type in a.dense_types]
    if not fitting:
        takes = "; ".join(f"{a.name} takes {', '.join(a.dense_types)}" for a in candidates)
        raise CheckpointError(f"{source}: the models are '{model_type}' models; {takes}")
    preferred = [a for a in fitting if a.shared_expert == bool(shared_experts)]
    chosen = preferred[0] if preferred else fitting[0]
    if chosen.shared_expert and shared_experts != 1:
        raise RecipeError(f"{source}: field 'shared_experts': {chosen.name} needs exactly one shared expert (a model whose MLP "
                          f"every token also goes through), not {shared_experts}")
    if shared_experts and not chosen.shared_expert:
        raise RecipeError(f"{source}: field 'shared_experts': {chosen.name} has no shared expert (Qwen2-MoE has one); "
                          "remove shared_experts or set architecture: qwen2_moe")
    return chosen
