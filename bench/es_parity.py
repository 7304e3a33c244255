"""Embedded bm25s vs Elasticsearch on the same corpus: index time, query latency, top-k parity.

The index is (re)created from scratch. Latency is per question, one request each (as
``prag answer`` retrieves), after one warm-up query; ``msearch_s`` is all questions in one
``_msearch``. ``gold_recall`` is the share of HotpotQA supporting paragraphs in the top-k.

    noida-db start --only elasticsearch --elasticsearch-port 9200 --data-dir /tmp/es &   # or a real cluster
    python bench/es_parity.py --es-url http://127.0.0.1:9200 --corpus hotpotqa/dev_distractor_sample.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from common import run_metadata


def timed_queries(retriever, queries: list[str], k: int) -> tuple[list, list[float]]:
    retriever.retrieve(queries[:1], k)  # warm-up
    results, seconds = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(retriever.retrieve([q], k)[0])
        seconds.append(time.perf_counter() - t0)
    return results, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--es-url", required=True)
    ap.add_argument("--es-index", default="prag-parity-bench")
    ap.add_argument("--corpus", required=True, help="HotpotQA/2Wiki JSON (questions are its questions)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request (a test server can be slow)")
    ap.add_argument("--out", default="runs/bench/es_parity.json")
    args = ap.parse_args()

    from prag_vllm.corpus import load_corpus
    from prag_vllm.retrieve import BM25Retriever, ElasticsearchConfig, ElasticsearchRetriever

    docs = load_corpus(args.corpus)
    data = json.loads(open(args.corpus, encoding="utf-8").read())
    queries = [q["question"] for q in data]
    gold = [{t for t, _ in q.get("supporting_facts", [])} for q in data]

    t0 = time.perf_counter()
    bm = BM25Retriever(docs)
    bm_index_s = time.perf_counter() - t0
    cfg = ElasticsearchConfig(url=args.es_url, index=args.es_index, request_timeout=args.timeout, max_retries=0)
    es = ElasticsearchRetriever(cfg, check=False)
    if es.client.indices.exists(index=cfg.index):
        es.client.indices.delete(index=cfg.index)
    t0 = time.perf_counter()
    es.index_corpus(docs)
    es_index_s = time.perf_counter() - t0

    a, a_s = timed_queries(bm, queries, args.k)
    b, b_s = timed_queries(es, queries, args.k)
    t0 = time.perf_counter()
    es.retrieve(queries, args.k)
    msearch_s = time.perf_counter() - t0

    ia = [[h.doc.id for h in x] for x in a]
    ib = [[h.doc.id for h in x] for x in b]
    n = len(queries)

    def recall(ranked):
        return sum(len(set(r) & g) for r, g in zip(ranked, gold)) / max(1, sum(len(g) for g in gold))

    result = {
        **run_metadata(), "corpus": os.path.basename(args.corpus), "documents": len(docs), "queries": n, "k": args.k,
        "server": es.client.info()["version"]["number"],
        "bm25s": {"index_s": bm_index_s, "p50_ms": 1000 * statistics.median(a_s),
                  "p90_ms": 1000 * statistics.quantiles(a_s, n=10)[-1], "gold_recall": recall(ia)},
        "elasticsearch": {"index_s": es_index_s, "p50_ms": 1000 * statistics.median(b_s),
                          "p90_ms": 1000 * statistics.quantiles(b_s, n=10)[-1], "msearch_s": msearch_s,
                          "gold_recall": recall(ib)},
        "parity": {"identical_top_k": sum(x == y for x, y in zip(ia, ib)),
                   "same_top_k_set": sum(set(x) == set(y) for x, y in zip(ia, ib)),
                   "same_top_1": sum(x[:1] == y[:1] for x, y in zip(ia, ib)),
                   "mean_overlap": sum(len(set(x) & set(y)) for x, y in zip(ia, ib)) / n},
    }
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    from prag_vllm.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
