"""prag-vllm: Parametric RAG (Su et al., 2025) served on vLLM's multi-LoRA runtime.

The online loop is three named modules:

* :mod:`prag_vllm.retrieve` -- Retrieve: BM25 top-k documents for a question.
* :mod:`prag_vllm.merge`    -- Update: the top-k per-document LoRAs merged exactly into one.
* :mod:`prag_vllm.generate` -- Generate: vLLM generation in one of five modes.

Offline, :mod:`prag_vllm.augment` rewrites documents and generates QA pairs, and
:mod:`prag_vllm.parameterize` trains one rank-2 FFN LoRA per document into an
:class:`prag_vllm.adapters.AdapterStore`. Nothing heavy is imported here.
"""

__version__ = "0.1.0"
