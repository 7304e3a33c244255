"""Does a per-document adapter fit the served model? (Checked before vLLM ever sees it.)"""

from __future__ import annotations

from prag_vllm.adapters import LoraAdapter
from prag_vllm.errors import AdapterError


def check_fits(adapter: LoraAdapter, shapes: dict[str, tuple[int, int]], max_rank: int) -> None:
    """Raise :class:`AdapterError` unless ``adapter``'s rank is within ``max_rank`` and every
    module of it exists in ``shapes`` (:func:`prag_vllm.ffn.ffn_shapes`) with matching shapes."""
    if not 1 <= adapter.r <= max_rank:
        raise AdapterError(f"rank {adapter.r} outside 1..{max_rank}")
    for module, (a, b) in adapter.weights.items():
        if module not in shapes:
            raise AdapterError(f"module {module} is not an FFN projection of the served model")
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (adapter.r, fan_in) or tuple(b.shape) != (fan_out, adapter.r):
            raise AdapterError(f"module {module}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the served model "
                               f"({adapter.r}x{fan_in} / {fan_out}x{adapter.r})")


def check_base_model(adapter: LoraAdapter, model_id: str | None) -> None:
    """Raise :class:`AdapterError` if ``adapter`` is stamped with another base model's identity
    (:func:`prag_vllm.adapters.model_identity`) than ``model_id``, the served one."""
    trained_on = adapter.meta.get("base_model_id")
    if model_id and trained_on and trained_on != model_id:
        raise AdapterError(f"trained on another base model (identity {trained_on}, served {model_id})")
