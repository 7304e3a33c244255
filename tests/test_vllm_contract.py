"""The vLLM names the CPU LoRA plugin patches (prag_vllm/vllm_plugin) exist in the installed
vLLM with the signatures and fields the patches rely on; and the engine configuration this
project builds is one vLLM's GPU LoRA accepts.

:data:`PATCHED` is the list of what is patched (docs/design/cpu_lora.md explains each);
``tests/test_plugin_gating.py`` checks that a real install patches exactly these names.
The checks read vLLM's stock objects even where the plugin is installed in this process
(the patcher's recorded originals, unwrapped)."""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest

from prag_vllm import vllm_plugin
from prag_vllm.vllm_plugin.patching import MISSING, PATCHES

ADDED = "added"
"""A name the plugin adds (an RPC of the worker, an idempotency marker): stock vLLM must not have it."""

PATCHED: list[tuple[str, str, str, str]] = [
    # (owner: "module" or "module:Class" (+: and every subclass defining the name), name, kind, patched by)
    *[("vllm.lora.punica_wrapper.punica_cpu", op, "replaced", "__init__ (lora_ops)") for op in (
        "bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")],
    ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU", "update_metadata", "wrapped", "punica"),
    ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU", "add_lora_linear", "replaced", "punica"),
    ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU", "_prag_planned", ADDED, "punica"),
    ("vllm.lora.lora_model", "parse_fine_tuned_lora_name", "wrapped", "loading"),
    ("vllm.lora.lora_model", "safetensors", "wrapped", "loading"),
    ("vllm.lora.lora_model", "_prag_loading", ADDED, "loading"),
    ("vllm.lora.lora_model:LoRAModel", "from_local_checkpoint", "wrapped", "merged"),
    ("vllm.lora.lora_model:LoRAModel", "_prag_manifest", ADDED, "merged"),
    ("vllm.v1.worker.worker_base:WorkerBase", "prag_preload_parts", ADDED, "merged"),
    ("vllm.lora.layers.base:BaseLayerWithLoRA+", "set_lora", "wrapped", "parts, gather"),
    ("vllm.lora.layers.base:BaseLayerWithLoRA+", "reset_lora", "wrapped", "gather"),
    ("vllm.v1.worker.worker_base:WorkerBase", "prag_gather_state", ADDED, "gather"),
    ("vllm.lora.model_manager:LoRAModelManager", "_create_lora_modules", "wrapped", "pools"),
    ("vllm.lora.model_manager:LoRAModelManager", "_create_merged_loras_inplace", "wrapped", "pools"),
    ("vllm.lora.model_manager:LoRAModelManager", "activate_adapter", "wrapped", "pools"),
    ("vllm.lora.model_manager:LoRAModelManager", "_prag_pools", ADDED, "pools"),
    ("vllm.v1.worker.worker_base:WorkerBase", "prag_pool_state", ADDED, "pools"),
    ("vllm.distributed.device_communicators.shm_broadcast:SpinCondition", "__init__", "wrapped", "idle"),
    ("vllm.distributed.device_communicators.shm_broadcast:SpinCondition", "_prag_idle", ADDED, "idle"),
    ("vllm.distributed.device_communicators.shm_broadcast", "SHM_READER_RECHECK_INTERVAL_MS", "replaced", "idle"),
    ("vllm.platforms.cpu:CpuPlatform", "check_and_update_config", "wrapped", "compile"),
    ("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA", "__init__", "wrapped", "compile"),
    ("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA", "_apply_lora_to_output", "replaced", "compile"),
    ("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA", "_prag_compile", ADDED, "compile"),
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm", "wrapped", "one_row"),
]

SIGNATURES: dict[tuple[str, str], list[str]] = {
    # the parameters each patch calls or takes over (replacements: exactly vLLM's, so callers still fit)
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink"):
        ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand"):
        ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_expand_slice"):
        ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset", "slice_size",
         "add_inputs"],
    ("vllm.lora.punica_wrapper.punica_cpu", "sgmv_shrink"):
        ["inputs", "lora_a_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor",
         "batches", "max_seq_length", "token_nums", "scaling"],
    ("vllm.lora.punica_wrapper.punica_cpu", "sgmv_expand"):
        ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor",
         "batches", "max_seq_length", "token_nums", "add_inputs"],
    ("vllm.lora.punica_wrapper.punica_cpu", "sgmv_expand_slice"):
        ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor",
         "batches", "max_seq_length", "token_nums", "slice_offset", "slice_size", "add_inputs"],
    ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU", "update_metadata"):
        ["self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs"],
    ("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU", "add_lora_linear"):
        ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices", "buffer", "kwargs"],
    ("vllm.lora.lora_model", "parse_fine_tuned_lora_name"): ["name", "weights_mapper"],
    ("vllm.lora.lora_model:LoRAModel", "from_local_checkpoint"):
        ["cls", "lora_dir", "expected_lora_modules", "peft_helper", "lora_model_id", "device", "dtype",
         "model_vocab_size", "weights_mapper", "skip_prefixes", "moe_ep_spec"],
    ("vllm.lora.model_manager:LoRAModelManager", "_create_lora_modules"): ["self"],
    ("vllm.lora.model_manager:LoRAModelManager", "_create_merged_loras_inplace"): ["self", "lora_model"],
    ("vllm.lora.model_manager:LoRAModelManager", "activate_adapter"): ["self", "lora_id"],
    ("vllm.distributed.device_communicators.shm_broadcast:SpinCondition", "__init__"):
        ["self", "is_reader", "context", "notify_address", "busy_loop_s"],
    ("vllm.platforms.cpu:CpuPlatform", "check_and_update_config"): ["cls", "vllm_config"],
    ("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA", "__init__"): ["self", "base_layer"],
    ("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA", "_apply_lora_to_output"): ["self", "x", "output"],
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"): ["layer", "remove_weight"],
}
LAYER_SIGNATURES = {"set_lora": ["self", "index", "lora_a", "lora_b"], "reset_lora": ["self", "index"]}


def resolve(owner: str) -> object:
    module, _, qualname = owner.rstrip("+").partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def owners(spec: str, name: str) -> list[object]:
    """The objects ``spec`` names; for ``Class+`` every class below it whose stock own entry has ``name``."""
    top = resolve(spec)
    if not spec.endswith("+"):
        return [top]
    import vllm.lora.layers  # noqa: F401  (imports every LoRA layer class)

    from prag_vllm.vllm_plugin.parts import _subclasses

    return [c for c in _subclasses(top) if PATCHES.original(c, name) is not MISSING]


def stock(owner: object, name: str) -> object:
    """vLLM's own value of ``owner.name`` (inherited where the owner has none), unwrapped from
    the plugin's wrappers if the plugin is installed in this process."""
    for base in getattr(owner, "__mro__", (owner,)):
        value = PATCHES.original(base, name)
        if value is not MISSING:
            return inspect.unwrap(value.__func__ if isinstance(value, classmethod) else value)
    return MISSING


def _ours(value: object) -> bool:
    return getattr(value, "__module__", "").startswith("prag_vllm") or isinstance(value, bool)


@pytest.mark.parametrize(("owner", "name", "kind"), [(o, n, k) for o, n, k, _ in PATCHED],
                         ids=[f"{o.rsplit('.', 1)[-1]}.{n}" for o, n, _, _ in PATCHED])
def test_patched_name_exists_in_vllm(owner, name, kind):
    """Every name the plugin replaces or wraps exists in stock vLLM; every name it adds does not
    (or is the plugin's own, installed in this process)."""
    targets = owners(owner, name)
    assert targets, f"{owner}: no class defines {name}"
    for obj in targets:
        if kind == ADDED:
            value = PATCHES.original(obj, name)
            assert value is MISSING or _ours(value), f"vLLM now defines {obj}.{name}: the plugin would shadow it"
        else:
            assert stock(obj, name) is not MISSING, f"{obj}.{name} is gone from vLLM"


@pytest.mark.parametrize(("owner", "name"), list(SIGNATURES), ids=[f"{o.rsplit('.', 1)[-1]}.{n}" for o, n in SIGNATURES])
def test_patched_callable_has_the_parameters_the_patch_relies_on(owner, name):
    assert list(inspect.signature(stock(resolve(owner), name)).parameters) == SIGNATURES[owner, name]


def test_every_replaced_or_wrapped_callable_has_a_signature_check():
    callables = {(o, n) for o, n, k, _ in PATCHED if k != ADDED and not o.endswith("+")}
    assert callables - set(SIGNATURES) == {("vllm.lora.lora_model", "safetensors"),
                                           ("vllm.distributed.device_communicators.shm_broadcast",
                                            "SHM_READER_RECHECK_INTERVAL_MS")}


@pytest.mark.parametrize("name", list(LAYER_SIGNATURES))
def test_lora_layer_slot_writers_take_index_and_factors(name):
    """parts/gather wrap ``set_lora``/``reset_lora`` of every LoRA layer class as ``(self, index, ...)``."""
    classes = owners("vllm.lora.layers.base:BaseLayerWithLoRA+", name)
    assert len(classes) >= 3
    for cls in classes:
        assert list(inspect.signature(stock(cls, name)).parameters) == LAYER_SIGNATURES[name], cls


def test_the_linear_layers_parts_writes_by_slot_define_set_lora():
    """parts.install recognizes vLLM's linear ``set_lora`` by these two classes' own entries."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    for cls in (BaseLinearLayerWithLoRA, MergedColumnParallelLinearWithLoRA):
        assert PATCHES.original(cls, "set_lora") is not MISSING


def test_cpu_punica_wrapper_calls_the_replaced_ops_by_module_global():
    """The six ops are replaced in ``punica_cpu``'s namespace: the wrapper must look them up there."""
    from vllm.lora.punica_wrapper import punica_cpu

    used = set()
    for fn in vars(punica_cpu.PunicaWrapperCPU).values():
        used |= set(getattr(getattr(fn, "__code__", None), "co_names", ()))
    assert {n for o, n, _, _ in PATCHED if o == "vllm.lora.punica_wrapper.punica_cpu"} <= used
    assert isinstance(inspect.getattr_static(punica_cpu.PunicaWrapperCPU, "token_lora_indices"), property)


def test_linear_layers_apply_lora_through_the_punica_wrapper():
    """compile replaces ``_apply_lora_to_output``: vLLM's calls ``punica_wrapper.add_lora_linear``
    with the layer's stacked slots and output slices (the op does the same), and the
    layer's base layer has the ``prefix`` the op names layers by."""
    from vllm.lora.layers import base_linear
    from vllm.model_executor.layers.linear import LinearBase

    code = stock(base_linear.BaseLinearLayerWithLoRA, "_apply_lora_to_output").__code__
    assert {"punica_wrapper", "add_lora_linear", "lora_a_stacked", "lora_b_stacked", "output_slices"} <= set(
        code.co_names)
    assert "prefix" in inspect.signature(LinearBase.__init__).parameters
    assert "_apply_lora_to_output" in stock(base_linear.BaseLinearLayerWithLoRA, "_apply_sync").__code__.co_names


def test_cpu_platform_turns_compilation_off_by_lora_config():
    """compile hides ``lora_config`` from ``CpuPlatform.check_and_update_config``: the one field it keys on."""
    from vllm.platforms import cpu

    assert isinstance(PATCHES.original(cpu.CpuPlatform, "check_and_update_config"), classmethod)
    assert "lora_config" in stock(cpu.CpuPlatform, "check_and_update_config").__code__.co_names


def test_custom_op_registration_takes_a_library_and_dispatch_key():
    from vllm.utils.torch_utils import direct_register_custom_op

    params = inspect.signature(direct_register_custom_op).parameters
    assert {"op_name", "op_func", "mutates_args", "fake_impl", "target_lib", "dispatch_key"} <= set(params)


def test_lora_loading_reads_through_the_patched_module_globals():
    """loading swaps ``lora_model.safetensors`` and ``lora_model.parse_fine_tuned_lora_name``:
    the loader must reach both through that module's namespace."""
    from vllm.lora import lora_model

    source = inspect.getsource(lora_model)
    assert "safetensors.safe_open(" in source and "parse_fine_tuned_lora_name(" in source
    real = PATCHES.original(lora_model, "safetensors")
    assert getattr(real, "_real", real).__name__ == "safetensors"


def test_lora_model_building_blocks_merged_calls():
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.utils import get_lora_id

    assert callable(get_lora_id)
    assert list(inspect.signature(LoRAModel.from_lora_tensors).parameters) == [
        "lora_model_id", "tensors", "peft_helper", "device", "dtype", "model_vocab_size", "weights_mapper",
        "skip_prefixes"]
    assert list(inspect.signature(LoRAModel.__init__).parameters)[:4] == ["self", "lora_model_id", "rank", "loras"]


def test_lora_model_manager_fields_the_pools_use():
    """pools' ``activate_adapter`` does vLLM's bookkeeping itself, on these fields."""
    from vllm.lora import model_manager

    source = inspect.getsource(model_manager.LoRAModelManager)
    for field in ("self._active_adapters", "self._registered_adapters", "self.lora_index_to_id", "self.modules",
                  "self.packed_modules_mapping", "self._create_lora_modules()", "self._create_merged_loras_inplace("):
        assert field in source, field


def test_worker_fields_the_rpcs_read():
    """The worker RPCs read ``worker.vllm_config.lora_config`` and
    ``worker.model_runner.lora_manager._adapter_manager``."""
    from vllm.lora import worker_manager
    from vllm.v1.worker import lora_model_runner_mixin, worker_base

    assert "self.vllm_config" in inspect.getsource(worker_base.WorkerBase.__init__)
    assert "self.lora_manager = " in inspect.getsource(lora_model_runner_mixin)
    assert "self._adapter_manager = " in inspect.getsource(worker_manager)


def test_cpu_linear_layers_dispatch_at_load_and_call_cpu_linear():
    """one_row wraps the ``layer.cpu_linear`` that vLLM's dispatch sets at load: the linear and
    embedding (LM head) methods must call the dispatch through the ``utils`` module at load, and
    every CPU product must go through ``layer.cpu_linear(x, weight, bias)``."""
    from vllm.model_executor.layers import linear, utils, vocab_parallel_embedding

    for module in (linear, vocab_parallel_embedding):
        source = inspect.getsource(module)
        assert "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm" in source
        assert "dispatch_cpu_unquantized_gemm(layer, remove_weight=" in source
    assert "layer.cpu_linear(x, weight, bias)" in inspect.getsource(utils.cpu_unquantized_gemm)
    assert "layer.cpu_linear = " in inspect.getsource(stock(utils, "dispatch_cpu_unquantized_gemm"))


def test_shared_memory_reader_recheck_is_read_at_use():
    """idle lowers ``SHM_READER_RECHECK_INTERVAL_MS``: vLLM must read the module global when it
    waits, not copy it at import."""
    from vllm.distributed.device_communicators import shm_broadcast

    assert isinstance(PATCHES.original(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS"), int)
    wait = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings
    assert "SHM_READER_RECHECK_INTERVAL_MS" in wait.timeout_ms.__code__.co_names


def test_installed_vllm_is_the_tested_release():
    import vllm

    assert vllm_plugin.tested_version(vllm.__version__), (vllm.__version__, vllm_plugin.TESTED_VLLM)
    assert vllm_plugin.tested_version("0.32.0") and vllm_plugin.tested_version("0.32.5.dev3+gabc")
    assert not vllm_plugin.tested_version("0.33.0") and not vllm_plugin.tested_version("0.3.2")
    assert not vllm_plugin.tested_version("1.32.0") and not vllm_plugin.tested_version("dev")


# --- the engine configuration on vLLM's GPU LoRA ---------------------------------------------


def _allowed_ranks() -> tuple[int, ...]:
    from vllm.config.lora import MaxLoRARanks  # the type of LoRAConfig.max_lora_rank

    return typing.get_args(MaxLoRARanks)


def test_project_lora_ranks_are_ranks_vllm_allows():
    """vLLM accepts only these slot ranks (``LoRAConfig.max_lora_rank``, GPU and CPU alike); the
    defaults of the engine and the server must be among them, and vLLM rejects the rest."""
    from vllm.config.lora import LoRAConfig

    from prag_vllm.generate import EngineConfig
    from serving.config import ServerConfig

    allowed = _allowed_ranks()
    assert allowed and 8 in allowed and 6 not in allowed
    assert EngineConfig(model="m").max_lora_rank in allowed
    assert ServerConfig().max_lora_rank in allowed
    for rank in allowed:
        assert LoRAConfig(max_lora_rank=rank).max_lora_rank == rank
    with pytest.raises(ValueError):
        LoRAConfig(max_lora_rank=6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_kwargs_make_a_valid_gpu_lora_config(monkeypatch, dtype):
    """What ``EngineConfig.vllm_kwargs`` gives ``vllm.LLM``: every key an engine argument, and the
    LoRA settings a valid ``LoRAConfig`` with targets vLLM's GPU LoRA wraps (nothing CPU-only)."""
    import dataclasses

    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.engine.arg_utils import EngineArgs

    from prag_vllm import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_dtype("auto") as on a GPU host
    assert generate.resolve_dtype("auto") == "bfloat16"
    cfg = generate.EngineConfig(model="m", dtype=dtype)
    kwargs = cfg.vllm_kwargs()
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kwargs) <= fields, set(kwargs) - fields
    assert not any("cpu" in k for k in kwargs)
    lora = LoRAConfig(max_lora_rank=kwargs["max_lora_rank"], max_loras=kwargs["max_loras"],
                      target_modules=kwargs["lora_target_modules"], lora_dtype="auto")
    assert lora.max_lora_rank in _allowed_ranks()
    assert sorted(lora.target_modules) == ["down_proj", "gate_proj", "up_proj"]
    assert kwargs["dtype"] in ("bfloat16", "float32")

