"""Offline cost, documents/hour: the paper's recipe vs this project's path, same documents, one run.

(a) paper  -- the Parametric RAG reference code's recipe re-created: per document, the
    rewrite and the QA list generated with HF ``generate`` one prompt at a time (batch 1,
    greedy, float32), then a fresh PEFT LoRA trained with batch 1 on every sample padded to
    3,000 tokens, float32.
(b) ours   -- ``prag augment`` (vLLM, all documents' prompts batched, bf16) then the batched
    trainer (``prag parameterize``: many documents per pass, bf16-mixed, no padding).

Both use the same prompts, QA parsing, training sequences, seeds, epochs, learning rate and
rank; only the engineering differs. Every padded step of (a) has the same shape
([1, 3000]), so with ``--paper-steps K`` only the first K steps of each document are timed
and the document's training time is K-step mean x its step count (flagged as estimated).
docs/hour counts augmentation + training, not the one-time model loads (reported apart).

    python bench/parameterize_speed.py --model smollm2-135m-instruct --docs 8 --paper-docs 2 --paper-steps 2
    python bench/parameterize_speed.py --docs 12 --paper-docs 2 --paper-steps 1 --out docs/results/parameterize_speed/parameterize_speed.json
                                        # 12 min on 2 CPU cores (the run in docs/offline_at_scale.md)
    python bench/parameterize_speed.py --docs 50 --paper-docs 3 --paper-steps 2 --out docs/results/parameterize_speed/parameterize_speed.json
                                        # the full run: about 37 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from common import run_metadata

logger = logging.getLogger("parameterize_speed")
PAPER_PAD_TO = 3000


class CountingChat:
    """The augmentation's ChatGenerator on a vLLM engine, counting prompt and output tokens."""

    def __init__(self, engine):
        self.engine, self.prompt_tokens, self.output_tokens, self.requests = engine, 0, 0, 0

    def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
        gens = self.engine.generate(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    use_tqdm=len(conversations) > 8)
        self.requests += len(gens)
        self.prompt_tokens += sum(g.prompt_tokens for g in gens)
        self.output_tokens += sum(len(g.token_ids) for g in gens)
        return [g.text for g in gens]


class HFOneByOne:
    """The paper's generation: HF ``generate``, one prompt at a time, greedy; counts tokens."""

    def __init__(self, model, tokenizer):
        self.model, self.tok, self.prompt_tokens, self.output_tokens, self.requests = model, tokenizer, 0, 0, 0

    def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
        import torch

        outs = []
        for conv in conversations:  # batch 1
            text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            enc = self.tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
            new = out[0, enc["input_ids"].shape[1]:]
            self.requests += 1
            self.prompt_tokens += enc["input_ids"].shape[1]
            self.output_tokens += int(new.shape[0])
            outs.append(self.tok.decode(new, skip_special_tokens=True))
        return outs


def run_ours(docs, model_path: Path, work: Path, args) -> dict:
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.augment import AugmentConfig, augment_corpus
    from prag_vllm.generate import EngineConfig, VLLMEngine
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.training import BatchConfig, BatchedTrainer
    from prag_vllm.training.driver import parameterize_batched

    t0 = time.perf_counter()
    engine = VLLMEngine(EngineConfig(model=str(model_path), dtype="bfloat16", enable_lora=False,
                                     max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs))
    engine_s = time.perf_counter() - t0
    counter = CountingChat(engine)
    try:
        t0 = time.perf_counter()
        augs = augment_corpus(docs, counter, work / "ours" / "augmented.jsonl",
                              AugmentConfig(batch_size=args.aug_batch))
        aug_s = time.perf_counter() - t0
    finally:
        engine.close()
    t0 = time.perf_counter()
    cfg = TrainConfig(precision="bf16-mixed")
    trainer = BatchedTrainer(model_path, cfg, BatchConfig(slots=args.slots))
    load_s = time.perf_counter() - t0
    summary = parameterize_batched(docs, augs, AdapterStore(work / "ours" / "store"), model_path, cfg, trainer=trainer)
    return {"documents": len(docs), "engine_start_s": round(engine_s, 1), "train_model_load_s": round(load_s, 1),
            "augment": _gen_stats(counter, aug_s, len(docs)), "train": summary,
            "train_s_per_doc": round(summary["seconds"] / len(docs), 2),
            "qa_failed": sum(augs[d.id].qa_failed for d in docs)}


def run_paper(docs, model_path: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prag_vllm.augment import AugmentConfig, augment_batch
    from prag_vllm.parameterize import DocumentTrainer, TrainConfig
    from prag_vllm.training.schedule import plan_document

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    gen = HFOneByOne(model, tok)
    cfg = AugmentConfig(max_retries=0)  # one generation per prompt, no retry loop
    t0 = time.perf_counter()
    augs = {}
    for d in docs:  # one document at a time
        augs[d.id] = augment_batch([d], gen, cfg)[0]
    aug_s = time.perf_counter() - t0
    tcfg = TrainConfig(precision="float32", batch_size=1, max_length=PAPER_PAD_TO)
    trainer = DocumentTrainer(model_path, tcfg, model=model, tokenizer=tok)
    pad = tok.pad_token_id
    train_s, real_tokens, steps_total, steps_timed, step_times = 0.0, 0, 0, 0, []
    for d in docs:
        plan = plan_document(d, augs[d.id], tok, epochs=tcfg.epochs, batch_size=1, max_length=PAPER_PAD_TO,
                             seed=tcfg.seed)
        trainer._reset(plan.seed)  # the reference trainer's seeded fresh LoRA
        params = [p for layer in trainer.lora_layers.values()
                  for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=0.0)
        trainer.model.train()
        mine = []
        for step in plan.steps[: args.paper_steps or None]:
            seq = plan.sequences[step[0]]
            ids = torch.full((1, PAPER_PAD_TO), pad, dtype=torch.long)
            mask = torch.zeros((1, PAPER_PAD_TO), dtype=torch.long)
            ids[0, :len(seq)], mask[0, :len(seq)] = torch.tensor(seq), 1
            t0 = time.perf_counter()
            padded_step_backward(trainer.model.get_base_model(), ids, ids.masked_fill(mask == 0, -100))
            opt.step()
            opt.zero_grad(set_to_none=True)
            mine.append(time.perf_counter() - t0)
            logger.info("paper step %d/%d of %r: %.1f s", len(mine), len(plan.steps), d.id, mine[-1])
        step_times += mine
        steps_total += len(plan.steps)
        steps_timed += len(mine)
        train_s += sum(mine) / len(mine) * len(plan.steps)  # every step has the same [1, 3000] shape
        real_tokens += plan.tokens
    return {"documents": len(docs), "model_load_s": round(load_s, 1), "augment": _gen_stats(gen, aug_s, len(docs)),
            "train": {"seconds": round(train_s, 1), "steps": steps_total, "steps_timed": steps_timed,
                      "estimated": steps_timed < steps_total,
                      "step_s_mean": round(sum(step_times) / len(step_times), 2),
                      "tokens": real_tokens, "padded_tokens": steps_total * PAPER_PAD_TO,
                      "tokens_per_s": round(real_tokens / train_s, 1),
                      "padded_tokens_per_s": round(steps_total * PAPER_PAD_TO / train_s, 1)},
            "train_s_per_doc": round(train_s / len(docs), 2),
            "qa_failed": sum(a.qa_failed for a in augs.values())}


def padded_step_backward(model, ids, labels, chunk: int = 512) -> float:
    """Forward + backward of one padded sample, as HF computes it (``model(ids, labels=...)``:
    logits and cross-entropy at all 3,000 positions), with two memory savings that do not
    change the loss: no attention mask (right padding under causal attention: real tokens
    never see the pads; PyTorch then uses its memory-efficient causal kernel -- with the
    explicit mask the [heads, 3000, 3000] attention weights of every layer are kept and
    Qwen2.5-0.5B went past 23 GB, measured), and the vocabulary projection + loss in chunks.
    Both make this baseline faster than the original, never slower."""
    import torch

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
    targets = labels[0, 1:]
    n = int((targets != -100).sum())
    h = hidden.detach().requires_grad_()
    total = 0.0
    for c in range(0, h.shape[0], chunk):
        logits = model.get_output_embeddings()(h[c:c + chunk]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[c:c + chunk], ignore_index=-100, reduction="sum") / n
        loss.backward()
        total += float(loss)
    hidden.backward(h.grad)
    return total


def _gen_stats(gen, seconds: float, n_docs: int) -> dict:
    return {"seconds": round(seconds, 1), "s_per_doc": round(seconds / n_docs, 2), "requests": gen.requests,
            "prompt_tokens": gen.prompt_tokens, "output_tokens": gen.output_tokens,
            "output_tokens_per_s": round(gen.output_tokens / seconds, 1)}


def same_work(ours: dict, paper: dict) -> dict:
    """The paper's recipe priced on *our* documents (removes the bias of its smaller sample):
    its generation rate applied to our generated tokens, its per-step time to our steps."""
    n = ours["documents"]
    aug_s = ours["augment"]["output_tokens"] / paper["augment"]["output_tokens_per_s"]
    train_s = ours["train"]["steps"] * paper["train"]["step_s_mean"]
    dph = round(3600 * n / (aug_s + train_s), 1)
    return {"augment_s_per_doc": round(aug_s / n, 1), "train_s_per_doc": round(train_s / n, 1),
            "documents_per_hour": dph, "speedup": round(ours["documents_per_hour"] / dph, 1)}


def _peak_rss_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def docs_per_hour(r: dict) -> float:
    return round(3600 * r["documents"] / (r["augment"]["seconds"] + r["train"]["seconds"]), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="registry name or local dir (default: the project's default)")
    ap.add_argument("--corpus", default=None, help="default: the shared HotpotQA sample")
    ap.add_argument("--docs", type=int, default=50, help="documents for this project's path")
    ap.add_argument("--paper-docs", type=int, default=3, help="the first N of them for the paper's recipe")
    ap.add_argument("--paper-steps", type=int, default=2, help="steps timed per paper document (0: all)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--aug-batch", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--work-dir", default="runs/parameterize_speed")
    ap.add_argument("--out", default="runs/parameterize_speed/result.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("prag_vllm.augment").setLevel(logging.ERROR)

    from prag_vllm.corpus import load_corpus
    from prag_vllm.fileio import atomic_write_json
    from prag_vllm.models import DEFAULT_MODEL, resolve_model

    args.model = args.model or DEFAULT_MODEL
    corpus = args.corpus or str(_shared_hotpotqa())
    model_path = resolve_model(args.model)
    docs = load_corpus(corpus)[: args.docs]
    work = Path(args.work_dir)
    shutil.rmtree(work / "ours", ignore_errors=True)  # a benchmark measures fresh work, never a resumed run
    t_all = time.perf_counter()
    result = {**run_metadata(), "model": args.model, "corpus": corpus, "load_avg_start": os.getloadavg()[0]}
    ours = run_ours(docs, model_path, work, args)
    result["ours"] = {**ours, "documents_per_hour": docs_per_hour(ours), "peak_rss_mb": _peak_rss_mb()}
    atomic_write_json(args.out, result)  # kept if the paper's recipe runs out of memory
    if not args.skip_paper:
        paper = run_paper(docs[: args.paper_docs], model_path, args)
        result["paper"] = {**paper, "documents_per_hour": docs_per_hour(paper), "peak_rss_mb": _peak_rss_mb()}
        result["speedup"] = round(result["ours"]["documents_per_hour"] / result["paper"]["documents_per_hour"], 1)
        result["paper_on_our_documents"] = same_work(result["ours"], result["paper"])
    result.update(load_avg_end=os.getloadavg()[0], wall_s=round(time.perf_counter() - t_all, 1))
    atomic_write_json(args.out, result)
    print(format_table(result))
    print(f"\nwritten to {args.out}")
    return 0


def format_table(result: dict) -> str:
    lines = ["| path | docs | augment s/doc | gen tok/s | train s/doc | train tok/s (real) | docs/hour |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("paper", "ours"):
        r = result.get(name)
        if r:
            est = " (est.)" if r["train"].get("estimated") else ""
            lines.append(f"| {name} | {r['documents']} | {r['augment']['s_per_doc']:.1f} | "
                         f"{r['augment']['output_tokens_per_s']:.1f} | {r['train_s_per_doc']:.1f}{est} | "
                         f"{r['train']['tokens_per_s']:.1f} | {r['documents_per_hour']:.1f} |")
    if "speedup" in result:
        same = result["paper_on_our_documents"]
        lines.append(f"\nspeed-up (documents/hour, ours / paper): {result['speedup']}x; "
                     f"pricing the paper's recipe on our {result['ours']['documents']} documents "
                     f"({same['documents_per_hour']} docs/hour): {same['speedup']}x")
    return "\n".join(lines)


def _shared_hotpotqa() -> Path:
    here = Path(__file__).resolve().parents[1]
    for base in [here, *here.parents]:
        p = base / "shared" / "data" / "hotpotqa" / "dev_distractor_sample.json"
        if p.is_file():
            return p
    raise SystemExit("no HotpotQA sample found: pass --corpus")


if __name__ == "__main__":
    sys.exit(main())
