"""Batched parameterization: many documents' LoRAs trained in one pass, exactly as one at a time.

* :mod:`~prag_vllm.training.layer` -- stacked per-document LoRA factors on the FFN Linears;
* :mod:`~prag_vllm.training.optim` -- per-document AdamW over the stacks;
* :mod:`~prag_vllm.training.schedule` -- each document's sequences and steps, micro-batching;
* :mod:`~prag_vllm.training.trainer` -- the trainer (documents in flight, like requests in a server);
* :mod:`~prag_vllm.training.driver` -- a corpus run: resumable, sharded, progress and summary.
"""

from prag_vllm.training.trainer import BatchConfig, BatchedTrainer, TrainedDocument

__all__ = ["BatchConfig", "BatchedTrainer", "TrainedDocument"]
