"""``prag eval``: closed-book vs standard RAG vs DA-RAG vs parametric vs combined on QA datasets.

For each dataset: select questions (first N, or first N per sub-type), retrieve top-k from
the closed corpus (the file's own pooled ``context`` paragraphs, or ``--corpus``), augment
and parameterize ONLY the retrieved documents (as the paper does), answer every
(question, mode), then write predictions, metrics, a Markdown report and plots. One vLLM
engine serves augmentation and answering; adapters are trained in between (transformers,
same process). Every phase resumes: a rerun of the same command redoes nothing finished.

Layout under ``out_dir``::

    run_config.json            settings that change results (a rerun must match them)
    runs/<dataset>/base.jsonl  closed-book / standard / da-rag rows (resumable logs)
    runs/<dataset>/<recipe>-<init>.jsonl  parametric / combined rows, per recipe and LoRA init
    timings.json               seconds and counts of augmentation, warm-up and training
    predictions.jsonl  metrics.json  report.md  f1.png  latency.png  diffs.png
    work/<dataset>/            index, augmentations, adapters/<model>/<training key>/
    work/warmup/<model>/<key>/ the warm-up LoRA

Several recipes (``EvalConfig.train`` a list) share the index and the augmentations; each
has its own adapter set (the training key names the recipe) and its own answer logs. The
work directory may live anywhere (``--work-dir``, e.g. under ``$PRAG_CACHE_DIR/eval/``), so
that a long run's adapters survive a deleted or moved output directory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prag_vllm.augment import AugmentConfig, augment_corpus, load_augmentations
from prag_vllm.datasets import Dataset, load_dataset, select_questions, subtype_order
from prag_vllm.errors import InputError
from prag_vllm.evaluation.report import write_outputs
from prag_vllm.evaluation.settings import INITS, Timings, answer_log, check_settings, train_settings
from prag_vllm.merge import DEFAULT_MERGE_POLICY
from prag_vllm.modes import MODES, get_mode
from prag_vllm.parameterize import TrainConfig
from prag_vllm.pipeline import Question
from prag_vllm.retrieve import check_top_k
from prag_vllm.workspace import Workspace

logger = logging.getLogger(__name__)

ADAPTER_MODES = tuple(m.name for m in MODES.values() if m.parametric)
AUGMENTED_MODES = ("da-rag", *ADAPTER_MODES)


@dataclass
class EvalConfig:
    """One evaluation run."""

    datasets: list[str]
    """Dataset files (format detected), or ``format=path`` to force a format."""
    out_dir: Path
    """Where predictions, metrics, report and plots go (resumable)."""
    work_dir: Path | None = None
    """Index, augmentations and adapters; default ``out_dir/work``."""
    corpus: str | None = None
    """Retrieval corpus for every dataset; default: each file's own passages (HotpotQA, 2Wiki)."""
    limit: int | None = None
    """Evaluate the first N questions of each dataset."""
    per_type: int | list[int] | None = None
    """Evaluate the first N questions of each sub-type (the paper: 300); a list gives one N per dataset, in
    the order of ``datasets`` (e.g. 2Wiki 15 and HotpotQA 30: 60 questions each)."""
    modes: list[str] = field(default_factory=lambda: list(MODES))
    """Answering modes."""
    top_k: int = 3
    """Documents retrieved per question."""
    merge_policy: str = DEFAULT_MERGE_POLICY
    """How the retrieved documents' adapters combine: ``mean`` (default) or ``sum`` (PRAG; merge.MERGE_POLICIES)."""
    inits: list[str] = field(default_factory=lambda: ["random"])
    """LoRA initializations to compare: ``random`` and/or ``warmup`` (paper Table 2)."""
    train: TrainConfig | list[TrainConfig] = field(default_factory=TrainConfig)
    """Per-document training settings, or a list of them, one per recipe (``prag eval --recipe
    default,paper``; recipe names must differ); ``warmup_adapter`` is set per init."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation settings."""
    augment_model: str | None = None
    """Train on the augmentations another model wrote in this work dir (its registry or directory
    name), to compare two models on one training text; they are read, never written, and must
    cover every retrieved document. Default: the answering model writes its own."""
    warmup_size: int = 300
    """QA pairs the warm-up LoRA is trained on."""
    warmup_epochs: int = 1
    """Passes over the warm-up pairs (the paper: 1)."""
    warmup_data: str | None = None
    """A separate QA file for the warm-up pairs (default: the datasets' non-evaluated questions)."""
    batch_size: int = 64
    """Requests per vLLM call when answering."""
    max_tokens: int = 32
    """Answer length budget."""
    offline_only: bool = False
    """Stop after augmentation and training (chunked long runs: answer later in one go,
    so that every mode's latency comes from full batches)."""

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else Path(self.out_dir) / "work"

    @property
    def trains(self) -> list[TrainConfig]:
        """The training settings of every evaluated recipe, in the order given."""
        return list(self.train) if isinstance(self.train, (list, tuple)) else [self.train]

    @property
    def recipes(self) -> list[str]:
        """The evaluated recipes' names, in the order given."""
        return [t.recipe for t in self.trains]


@dataclass
class DatasetRun:
    """One dataset's part of an evaluation."""

    name: str
    data: Dataset
    questions: list[Question]
    ws: Workspace
    documents: list | None = None
    subtypes: list[str] = field(default_factory=list)


def train_adapters(docs, augmentations, store, model_path, cfg: TrainConfig) -> dict:
    """The one place eval trains document adapters: the batched trainer, as ``prag parameterize``."""
    from prag_vllm.training.driver import parameterize_batched

    return parameterize_batched(docs, augmentations, store, model_path, cfg)


def check_borrowed_augmentations(missing: list, augment_model: str, path: Path, what: str = "documents") -> None:
    """Augmentations another model wrote are only read (``augment_model``): :class:`InputError`
    when ``missing`` (documents without one in ``path``) is not empty."""
    if missing:
        raise InputError(f"{what}: {len(missing)} have no augmentation by {augment_model} in {path}; "
                         f"run with --model {augment_model} first, or drop augment_model")


def _parse_dataset_arg(spec: str) -> tuple[str | None, str]:
    from prag_vllm.datasets import FORMATS

    fmt, sep, path = spec.partition("=")
    return (fmt, path) if sep and fmt in FORMATS else (None, spec)


def prepare(cfg: EvalConfig) -> list[DatasetRun]:
    """Validate the configuration and load every dataset (no model is touched)."""
    from prag_vllm.corpus import load_corpus
    from prag_vllm.merge import check_merge_policy

    if not cfg.datasets:
        raise InputError("give at least one dataset file")
    for m in cfg.modes:
        get_mode(m)
    check_top_k(cfg.top_k)
    check_merge_policy(cfg.merge_policy)
    bad = [i for i in cfg.inits if i not in INITS]
    if bad or not cfg.inits:
        raise InputError(f"unknown LoRA init {bad or cfg.inits}; choose from {', '.join(INITS)}")
    if not cfg.trains or len(set(cfg.recipes)) != len(cfg.recipes):
        raise InputError(f"give each recipe once, got {cfg.recipes}")
    per_type = cfg.per_type if isinstance(cfg.per_type, list) else [cfg.per_type] * len(cfg.datasets)
    if len(per_type) != len(cfg.datasets):
        raise InputError(f"per_type gives {len(per_type)} counts for {len(cfg.datasets)} datasets; "
                         f"give one count, or one per dataset")
    for name, value in (("limit", cfg.limit), *(("per_type", n) for n in per_type), ("warmup_size", cfg.warmup_size),
                        ("warmup_epochs", cfg.warmup_epochs), *(("epochs", t.epochs) for t in cfg.trains)):
        if value is not None and value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    retrieves = any(get_mode(m).retrieves for m in cfg.modes)
    shared_corpus = load_corpus(cfg.corpus) if cfg.corpus and retrieves else None
    runs: list[DatasetRun] = []
    for spec, n_per_type in zip(cfg.datasets, per_type):
        fmt, path = _parse_dataset_arg(spec)
        data = load_dataset(path, fmt)
        questions = [replace(q, mode=None, k=None)
                     for q in select_questions(data.questions, cfg.limit, n_per_type)]
        name = data.name if all(r.name != data.name for r in runs) else f"{data.name}-{Path(path).stem}"
        docs = shared_corpus if shared_corpus is not None else data.documents
        if retrieves and docs is None:
            raise InputError(f"{path}: {data.name} has no passages; give --corpus for the retrieval modes "
                             f"(or use --mode closed-book)")
        runs.append(DatasetRun(name, data, questions, Workspace.at(cfg.work / name), docs,
                               subtype_order(data, questions)))
    return runs


def _warmup_pairs(cfg: EvalConfig, runs: list[DatasetRun]) -> list[tuple[str, str]]:
    """The warm-up LoRA's QA pairs (see :mod:`prag_vllm.evaluation.warmup`); InputError if none."""
    from prag_vllm.evaluation.warmup import warmup_pairs

    evaluated = [q for r in runs for q in r.questions]
    if cfg.warmup_data:
        fmt, path = _parse_dataset_arg(cfg.warmup_data)
        pools = [load_dataset(path, fmt).questions]
    else:
        pools = [[q for q in r.data.questions if q.id not in {e.id for e in r.questions}] for r in runs]
    pairs = warmup_pairs(pools, evaluated, cfg.warmup_size)
    if not pairs:
        raise InputError("no questions left for the warm-up LoRA (every question is evaluated); "
                         "evaluate fewer questions or give --warmup-data")
    return pairs


def validate(cfg: EvalConfig) -> None:
    """Every input check of :func:`run_eval`, without touching a model or writing a file."""
    runs = prepare(cfg)
    if "warmup" in cfg.inits and any(m in ADAPTER_MODES for m in cfg.modes):
        _warmup_pairs(cfg, runs)


def _settings(cfg: EvalConfig, runs: list[DatasetRun], model_name: str) -> dict:
    """Everything that changes a finished row; a rerun into the same ``out_dir`` must match
    (see :func:`~prag_vllm.evaluation.settings.check_settings`)."""
    train = {t.recipe: train_settings(t) for t in cfg.trains}
    augment = asdict(cfg.augment)
    if not augment["distinct_answers"]:  # added later: recorded only when set, so older runs resume
        del augment["distinct_answers"]
    out = {"model": model_name, "top_k": cfg.top_k, "train": train, "augment": augment,
           "max_tokens": cfg.max_tokens, "corpus": str(Path(cfg.corpus).resolve()) if cfg.corpus else None,
           "warmup": {"size": cfg.warmup_size, "epochs": cfg.warmup_epochs, "data": cfg.warmup_data},
           "datasets": {r.name: str(r.data.path.resolve()) for r in runs}}
    if cfg.augment_model and cfg.augment_model != model_name:
        out["augment_model"] = cfg.augment_model
    if cfg.merge_policy != "sum":  # added later: recorded only when set, so older runs resume
        out["merge_policy"] = cfg.merge_policy
    return out


_check_settings = check_settings  # the name the tests and older callers use


def _adapter_sets(cfg: EvalConfig) -> list[tuple[TrainConfig, str]]:
    """(recipe's training settings, init) of every adapter set, recipes first."""
    return [(tcfg, init) for tcfg in cfg.trains for init in cfg.inits]


def _augmentations_path(run: DatasetRun, model_name: str, acfg: AugmentConfig) -> Path:
    from prag_vllm.augment import PROMPT_VERSION

    distinct = "-distinct" if acfg.distinct_answers else ""
    return run.ws.root / "augmented" / f"{model_name}-rw{acfg.n_rewrites}-qa{acfg.n_qa}-p{PROMPT_VERSION}{distinct}.jsonl"


def _release_engine(engine, docs: list, augs: dict, store) -> None:
    """Stop a lazily started engine before training that has work to do: its processes hold
    GBs of memory the trainer wants (~3.7 GB for the default model), and training takes far
    longer than the engine's restart for the answers (measured 2026-12-06)."""
    from prag_vllm.training.driver import pending

    if not getattr(engine, "started", False) or not pending(docs, augs, store)[0]:
        return
    logger.info("stopping the vLLM engine for training (it is started again to answer)")
    engine.close()


def run_eval(cfg: EvalConfig, engine, model_path: str | os.PathLike | None = None) -> dict:
    """Run (or resume) an evaluation with ``engine`` (a :class:`~prag_vllm.generate.VLLMEngine`,
    or anything with its ``generate``/``chat``/``cfg.model``; only used when work is left)."""
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.evaluation.warmup import train_warmup_adapter, warmup_key
    from prag_vllm.pipeline import ParametricRAG
    from prag_vllm.retrieve.factory import RetrieverConfig, build_retriever

    runs = prepare(cfg)
    adapter_modes = [m for m in cfg.modes if m in ADAPTER_MODES]
    pairs = _warmup_pairs(cfg, runs) if "warmup" in cfg.inits and adapter_modes else []
    model_path = str(model_path or engine.cfg.model)
    model_name = Path(model_path).name
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, _settings(cfg, runs, model_name))
    timings = Timings(out / "timings.json")
    base_modes = [m for m in cfg.modes if m not in ADAPTER_MODES]
    needs_aug = any(m in AUGMENTED_MODES for m in cfg.modes)

    # Retrieve: the documents each dataset's questions need
    retrievers, needed = {}, {}
    for run in runs:
        if run.documents is None:
            continue
        retrievers[run.name] = build_retriever(RetrieverConfig(kind="bm25", index_dir=str(run.ws.index_dir)),
                                               run.documents)
        hits = retrievers[run.name].retrieve([q.question for q in run.questions], cfg.top_k)
        needed[run.name] = list({h.doc.id: h.doc for row in hits for h in row}.values())
        logger.info("%s: %d questions retrieve %d distinct documents (top-%d)", run.name, len(run.questions),
                    len(needed[run.name]), cfg.top_k)

    # Augment the retrieved documents (vLLM), once for every recipe
    augs = {}
    for run in runs:
        path = _augmentations_path(run, cfg.augment_model or model_name, cfg.augment)
        augs[run.name] = load_augmentations(path)
        todo = [d for d in needed.get(run.name, []) if d.id not in augs[run.name]] if needs_aug else []
        if cfg.augment_model not in (None, model_name):
            check_borrowed_augmentations(todo, cfg.augment_model, path, what=f"{run.name}: retrieved documents")
        if todo:
            t0 = time.perf_counter()
            augs[run.name] = augment_corpus(todo, engine, path, cfg.augment)
            timings.add([run.name, "augment"], docs=len(todo), seconds=time.perf_counter() - t0)

    # Warm-up LoRA (transformers; one per distinct warm-up key, usually shared by the recipes),
    # then one adapter per retrieved document, recipe and init (the store key names both)
    warmup_paths: dict[str, Path] = {}
    for tcfg in cfg.trains if pairs else []:
        path = cfg.work / "warmup" / model_name / warmup_key(pairs, tcfg, cfg.warmup_epochs, model_name)
        warmup_paths[tcfg.recipe] = path
        summary = train_warmup_adapter(pairs, model_path, tcfg, path, cfg.warmup_epochs)
        if summary["trained"]:
            timings.add(["warmup"], pairs=len(pairs), seconds=summary["seconds"])
    stores: dict[tuple[str, str, str], AdapterStore] = {}
    for run in runs:
        for tcfg, init in _adapter_sets(cfg) if adapter_modes and run.name in needed else []:
            warm = warmup_paths.get(tcfg.recipe) if init == "warmup" else None
            tcfg = replace(tcfg, warmup_adapter=str(warm) if warm else None)
            stores[run.name, tcfg.recipe, init] = store = run.ws.store(model_path, tcfg)
            _release_engine(engine, needed[run.name], augs[run.name], store)
            summary = train_adapters(needed[run.name], augs[run.name], store, model_path, tcfg)
            if summary["trained"]:
                timings.add([run.name, "train", tcfg.recipe, init], docs=summary["trained"],
                            seconds=summary["seconds"], tokens=summary["tokens"])

    if cfg.offline_only:
        logger.info("offline phases done (--offline-only); answers, metrics and report are left for a later run")
        return {}

    # Answer every (question, mode): base modes once, adapter modes once per recipe and init
    for run in runs:
        retriever = retrievers.get(run.name)
        jobs = [(answer_log(out, run.name), base_modes, AdapterStore(run.ws.root / "no-adapters"))] if base_modes else []
        jobs += [(answer_log(out, run.name, tcfg.recipe, init), adapter_modes, stores[run.name, tcfg.recipe, init])
                 for tcfg, init in _adapter_sets(cfg) if adapter_modes]
        for log, modes, store in jobs:
            rag = ParametricRAG(retriever, store, engine, augs[run.name], default_k=cfg.top_k,
                                merge_policy=cfg.merge_policy)
            logger.info("%s: answering %s (%s)", run.name, ", ".join(modes), log.stem)
            rag.answer_file(run.questions, log, modes, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)

    return write_outputs(cfg, runs, out, model_name, timings.data,
                         {name: len(docs) for name, docs in needed.items()})
