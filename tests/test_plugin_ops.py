"""The plugin's op registry (``prag_vllm.vllm_plugin.ops``): each op registers once per process,
and a failed registration is tried again."""

import pytest
import torch

from prag_vllm.vllm_plugin import ops


def _double(x: torch.Tensor, tag: str) -> torch.Tensor:
    return x * 2


def _double_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


def test_register_is_once_per_process_and_the_op_runs():
    ops.register("test_double", _double, _double_fake, mutates_args=[])
    ops.register("test_double", _double, _double_fake, mutates_args=[])  # a second install: no error
    assert ops.registered("test_double")
    assert torch.equal(torch.ops.prag.test_double(torch.ones(3), "t"), torch.full((3,), 2.0))


def test_a_failed_registration_records_nothing():
    def no_annotations(x, tag):  # torch infers the schema from annotations: this one fails
        return x

    with pytest.raises(ValueError):
        ops.register("test_broken", no_annotations, _double_fake, mutates_args=[])
    assert not ops.registered("test_broken")
    ops.register("test_broken", _double, _double_fake, mutates_args=[])  # the next install tries again
    assert ops.registered("test_broken")
