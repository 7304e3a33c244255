"""Benchmark data that the project generates itself (no download, no model).

* :mod:`prag_vllm.benchdata.fictional` -- a fictional-knowledge corpus (invented towns,
  people, organisations and works, one short document each) with single-hop and two-hop
  questions whose answers no pretrained model can know; ``prag bench-data fictional``.
"""

from prag_vllm.benchdata.fictional import FictionalSet, generate, write

__all__ = ["FictionalSet", "generate", "write"]
