"""The FFN projections a document adapter trains, named and shaped as the base model has them.

Parametric RAG puts LoRA on the three projections of every decoder layer's MLP. Their
module paths depend on the architecture (``model.layers.{i}.mlp`` in Qwen2 and Llama,
the supported ones); their shapes come from the model's ``config.json``
(``num_hidden_layers``, ``hidden_size``, ``intermediate_size``). Everything that builds or
checks an adapter's modules (:meth:`prag_vllm.adapters.LoraAdapter.zeros`, the server's
validation in :mod:`serving.adapters.validate`) asks :func:`ffn_shapes`.
"""

from __future__ import annotations

from prag_vllm.errors import InputError

FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
"""Leaf names of the FFN projections (PEFT's ``target_modules``)."""

FFN_PATHS: dict[str, str] = {
    "llama": "model.layers.{layer}.mlp",
    "qwen2": "model.layers.{layer}.mlp",
}
"""``model_type`` (from ``config.json``) -> path of decoder layer ``{layer}``'s MLP, as
``named_modules()`` of the Hugging Face model (and so PEFT and vLLM) name it."""


def ffn_path(model_config: object) -> str:
    """The MLP path template of ``model_config``'s architecture; :class:`InputError` if unknown."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in FFN_PATHS:
        arch = ", ".join(getattr(model_config, "architectures", None) or []) or "?"
        raise InputError(f"unsupported model architecture {model_type!r} ({arch}): its FFN module paths are "
                         f"unknown; supported model types: {', '.join(sorted(FFN_PATHS))} (prag_vllm.ffn.FFN_PATHS)")
    return FFN_PATHS[model_type]


def ffn_shapes(model_config: object) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every FFN projection of ``model_config`` (a Hugging Face
    config), layer by layer, in :data:`FFN_TARGETS` order."""
    path = ffn_path(model_config)
    h, i = model_config.hidden_size, model_config.intermediate_size
    io = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {f"{path.format(layer=layer)}.{name}": io[name]
            for layer in range(model_config.num_hidden_layers) for name in FFN_TARGETS}
