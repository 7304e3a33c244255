"""Update, online: per-document adapters -> one merged adapter per document set, both cached.

* :mod:`~serving.adapters.validate`: does an adapter fit the served model (module paths and
  shapes from :func:`prag_vllm.ffn.ffn_shapes`, rank, base-model identity)?
* :mod:`~serving.adapters.doc_cache`: :class:`DocAdapterCache`, validated per-document
  adapters in memory (byte-bounded LRU), and the documents whose adapter was rejected
  (answered in context instead, never sent to vLLM).
* :mod:`~serving.adapters.preload`: reading the corpus's adapters at start, in the
  background, handing them to vLLM's worker in batches.
* :mod:`~serving.adapters.merged_cache`: :class:`MergedAdapterLRU`, the merged adapters
  (PEFT directories or merge manifests vLLM loads) keyed by document-id set, pinned while
  in use, single flight, deleted and unloaded from vLLM when evicted.
"""
