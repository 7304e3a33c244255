"""Evaluation harness: the paper's mode comparison on QA datasets (``prag eval``)."""

from prag_vllm.evaluation.run import EvalConfig, prepare, run_eval, train_adapters

__all__ = ["EvalConfig", "prepare", "run_eval", "train_adapters"]
