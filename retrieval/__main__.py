"""Command line: build an index from a corpus once, then search it, evaluate it or precompute neighbours.

    python -m retrieval build --corpus data/my_corpus.jsonl --name mycorpus
    python -m retrieval search --index mycorpus "what causes tides?"
    python -m retrieval search --index mycorpus --retriever hybrid --rerank cross-encoder/ms-marco-MiniLM-L-6-v2 "..."
    python -m retrieval eval --index scifact --beir /path/to/scifact --split train
    python -m retrieval eval --index scifact nfc --beir /data/scifact /data/nfcorpus --retriever dense bm25 hybrid
    python -m retrieval lexical --index mycorpus          # add a BM25 index to a finished index
    python -m retrieval eval --index squad --qa /path/to/questions.jsonl
    python -m retrieval neighbours --index mycorpus --input train.jsonl --out data/train_neighbours
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_TOKENIZER = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm"
INDEX_ROOT = Path("indexes")


# ---- model names -> objects, through the ground-floor model resolver
def load_tokenizer(name: str):
    from backbones import load_tokenizer as resolve_load

    return resolve_load(name)


def load_embedder(name: str, device: str | None = None):
    from backbones import load_embedder as resolve_load

    return resolve_load(name, device=device)


def index_dir(name_or_path: str) -> Path:
    """`--index` takes a directory or the NAME of indexes/NAME."""
    p = Path(name_or_path)
    return p if p.exists() or p.parent != Path(".") else INDEX_ROOT / name_or_path


def load_encoder(name: str, device: str | None = None, pooling: str | None = None):
    """A sentence-transformers model by alias or path, with its pooling replaced when `pooling` is given."""
    model = load_embedder(name, device=device)
    if pooling:
        from retrieval.encoders import set_pooling

        set_pooling(model, pooling)
    return model


def fusion_config(args):
    from retrieval.fusion import FusionConfig, parse_weights

    return FusionConfig(method=args.fusion, weights=parse_weights(args.fusion_weights), rrf_k=args.rrf_k,
                        normalisation=args.fusion_normalisation, depth=args.fusion_depth)


def check_query_flags(args) -> None:
    """Flag values no index can use, refused before anything is opened or loaded (FlagError: exit 2)."""
    from retrieval.errors import FlagError

    for name in ("k", "ks", "rrf_k", "fusion_depth", "rerank_depth", "limit", "nprobe", "chunk_depth", "chunk_size"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                raise FlagError(f"--{name.replace('_', '-')}: must be 1 or more, got {value}; give a positive number")
    try:
        fusion_config(args)
    except ValueError as error:
        raise FlagError(f"--fusion-weights: {error}") from None


def index_manifest(args, index: str | None = None) -> tuple[Path, dict]:
    """(directory, manifest) of the index a query command names, with the flags that depend on its kind checked."""
    from retrieval.errors import FlagError
    from retrieval.manifest import read_manifest

    d = index_dir(index or args.index)
    man = read_manifest(d)
    if args.nprobe is not None and "IVF" not in str(man.get("factory")):
        raise FlagError(f"--nprobe: {d} is a {man.get('factory')} index, and nprobe (inverted lists searched) applies "
                        f"to IVF indexes only; drop --nprobe")
    return d, man


def open_retriever(args, need_tokenizer: bool = False, index: str | None = None, kind: str | None = None):
    from retrieval import Retriever
    from retrieval.manifest import verify_directory
    from retrieval.rerank import RerankConfig
    from retrieval.retriever import query_encoder_record

    check_query_flags(args)
    d, man = index_manifest(args, index)
    kind = kind or getattr(args, "retriever", None) or "dense"
    verify = True if getattr(args, "verify", False) else "auto"
    verify_directory(d, man, verify, retriever=kind)  # before seconds of model loading
    embedder = None
    if kind != "bm25":
        embedder = load_encoder(getattr(args, "query_embedder", None) or args.embedder or
                                query_encoder_record(man)["name"], device=getattr(args, "device", None),
                                pooling=getattr(args, "pooling", None))
    tokenizer = load_tokenizer(args.tokenizer or man["tokenizer"]["name"]) if (need_tokenizer or args.tokenizer) \
        else None
    reranker = RerankConfig(args.rerank, depth=args.rerank_depth) if getattr(args, "rerank", None) else None
    return Retriever.load(d, tokenizer=tokenizer, embedder=embedder, chunk_size=args.chunk_size, nprobe=args.nprobe,
                          retriever=kind, fusion=fusion_config(args), reranker=reranker,
                          verify=False)  # checked above


# ---- commands
def cmd_build(args) -> int:
    from retrieval import BuildConfig, BuildSettingsError, CorpusSpec, IndexConfig, build_index, load_corpus
    from retrieval.lexical import LexicalConfig

    out = Path(args.out) if args.out else INDEX_ROOT / args.name
    try:  # the settings first (the factory string is parsed here): before the corpus is read or anything embedded
        cfg = BuildConfig(chunk_size=args.chunk_size, batch_size=args.batch_size, shard_size=args.shard_size,
                          with_title=not args.no_title, overwrite=args.overwrite, wait_for_lock=args.wait,
                          devices=args.devices.split(",") if args.devices else None,
                          index=IndexConfig(factory=args.factory, nprobe=args.nprobe,
                                            memory_budget_gb=args.memory_budget_gb, flat_threshold=args.flat_threshold,
                                            on_disk={"auto": None, "yes": True, "no": False}[args.on_disk],
                                            opq=args.opq),
                          lexical=LexicalConfig(k1=args.bm25_k1, b=args.bm25_b, with_title=not args.no_title)
                          if args.retriever in ("bm25", "hybrid") else None,
                          query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                          normalize={"auto": None, "yes": True, "no": False}[args.normalize])
    except ValueError as e:
        raise BuildSettingsError(f"build flags: {e}") from None
    spec = CorpusSpec(args.corpus, args.format, args.id_field, args.title_field or None, args.text_field,
                      args.hf_split)
    docs = load_corpus(spec)
    if args.max_docs:
        docs = docs[:args.max_docs]
    print(f"corpus: {len(docs)} documents from {args.corpus}", file=sys.stderr)
    if args.device is None and "LOCAL_RANK" in os.environ:  # under torchrun: one device per rank
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    manifest = build_index(docs, out, tokenizer=load_tokenizer(args.tokenizer),
                           embedder=load_encoder(args.embedder, device=args.device, pooling=args.pooling),
                           config=cfg, tokenizer_alias=args.tokenizer, embedder_alias=args.embedder, source=args.corpus,
                           query_embedder=load_encoder(args.query_embedder, device=args.device, pooling=args.pooling)
                           if args.query_embedder else None, query_embedder_alias=args.query_embedder)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: manifest[k] for k in ("num_documents", "num_chunks", "factory", "nprobe",
                                                   "tuned_recall_at_10", "last_run_seconds")}, indent=2))
        print(f"index written to {out}", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    retriever = open_retriever(args)
    res = retriever.search(args.queries, args.k)
    rows = []
    for q, ids, scores, docs, texts in zip(args.queries, res.ids, res.scores, res.doc_ids, res.chunk_texts):
        rows.append({"query": q, "hits": [{"chunk": int(i), "score": round(float(s), 4), "doc": dd, "text": t}
                                          for i, s, dd, t in zip(ids, scores, docs, texts) if i >= 0]})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for row in rows:
        print(f"\n## {row['query']}")
        for rank, hit in enumerate(row["hits"], 1):
            text = " ".join(hit["text"].split())
            print(f"{rank:>3}. [{hit['score']:.3f}] {hit['doc']} #{hit['chunk']}: {text[:160]}")
    return 0


def cmd_eval(args) -> int:
    from retrieval import evaluate_beir, evaluate_qa
    from retrieval.evaluation import check_beir_folder

    if len(args.index) > 1 or len(args.retriever) > 1 or (args.beir and len(args.beir) > 1):
        return eval_table(args)
    args.index, args.retriever = args.index[0], args.retriever[0]
    args.beir = args.beir[0] if args.beir else None
    if args.beir:
        check_query_flags(args)
        check_beir_folder(args.beir, args.split)  # before the index is opened and the query encoder loaded
    retriever = open_retriever(args)
    if args.beir:
        result = evaluate_beir(retriever, args.beir, split=args.split, k=args.k, chunk_depth=args.chunk_depth,
                               limit=args.limit)
    else:
        result = evaluate_qa(retriever, args.qa, ks=args.ks, limit=args.limit, question_field=args.question_field,
                             answers_field=args.answers_field, passage_field=args.passage_field)
    result = {"index": str(index_dir(args.index)), **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| " + " | ".join(result) + " |")
        print("|" + "---|" * len(result))
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    return 0


def eval_table(args) -> int:
    """Several BEIR datasets (each with its index) x several retrievers -> one table."""
    from retrieval import evaluate_beir
    from retrieval.errors import FlagError
    from retrieval.evaluation import check_beir_folder

    if not args.beir:
        raise FlagError("--qa: several --index or --retriever values need --beir (one folder per index); with --qa "
                        "give one --index and one --retriever per command")
    if len(args.index) != len(args.beir):
        raise FlagError(f"--index: {len(args.index)} values for {len(args.beir)} --beir folders; give one index per "
                        f"dataset, in the same order")
    check_query_flags(args)
    for beir in args.beir:
        check_beir_folder(beir, args.split)
    for index in args.index:  # every index's kind against the flags, before the first is searched
        index_manifest(args, index)
    rows = []
    for index, beir in zip(args.index, args.beir):
        for kind in args.retriever:
            retriever = open_retriever(args, index=index, kind=kind)
            result = evaluate_beir(retriever, beir, split=args.split, k=args.k, chunk_depth=args.chunk_depth,
                                   limit=args.limit)
            name = kind + (f"+rerank({args.rerank})" if args.rerank else "")
            rows.append({"dataset": Path(beir).name, "retriever": name, **result})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    return 0


def cmd_lexical(args) -> int:
    from retrieval.lexical import LexicalConfig, build_lexical
    from retrieval.manifest import read_manifest

    d = index_dir(args.index)
    read_manifest(d)  # only a finished index: its chunk database is complete
    man = build_lexical(d, LexicalConfig(k1=args.k1, b=args.b, with_title=not args.no_title),
                        overwrite=args.overwrite)
    print(json.dumps({"params": man["params"], "num_chunks": man["num_chunks"], "vocabulary": man["vocabulary"]},
                     indent=2))
    return 0


def cmd_neighbours(args) -> int:
    from retrieval import precompute_neighbours
    from retrieval.evaluation import read_jsonl_records

    retriever = open_retriever(args, need_tokenizer=not args.per_example)
    fields = [args.field] + ([args.exclude_field] if args.exclude_field else [])
    recs = read_jsonl_records(args.input, fields)
    exclude = [r[args.exclude_field] for r in recs] if args.exclude_field else None
    pn = precompute_neighbours(retriever, [r[args.field] for r in recs], args.out, args.k,
                               chunked=not args.per_example, exclude_doc_ids=exclude)
    print(f"{len(pn)} examples, {len(pn.tokens)} query rows, neighbours {tuple(pn.tokens.shape)} -> {args.out}")
    return 0


def cmd_info(args) -> int:
    from retrieval.manifest import read_manifest, verify_directory

    d = index_dir(args.index)
    man = read_manifest(d)
    verify_directory(d, man, True if args.verify else False)
    if args.verify:
        print(f"{d}: {len(man.get('files', {}))} files match their sizes and checksums", file=sys.stderr)
    print(json.dumps(man, indent=2))
    return 0


# ---- argument parsing
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fmt = argparse.ArgumentDefaultsHelpFormatter
    b = sub.add_parser("build", help="chunk, embed and index a corpus (resumes an interrupted build)",
                       formatter_class=fmt, description="Cut each document into chunks of --chunk-size tokens of "
                       "the decoder's tokenizer, embed them with a sentence-transformers model and index the "
                       "vectors with FAISS. An interrupted build resumes when the same command is run again.")
    b.add_argument("--corpus", required=True, help="JSONL file, BEIR folder (with corpus.jsonl), folder of .txt "
                   "files, or a Hugging Face dataset (saved folder, data file or hub name)")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--name", help="write the index to indexes/NAME")
    where.add_argument("--out", help="write the index to this directory instead")
    b.add_argument("--format", default="auto", choices=["auto", "jsonl", "beir", "txt", "hf"])
    b.add_argument("--id-field", default="id", help="JSONL/HF field holding the document id")
    b.add_argument("--title-field", default="title", help="field holding the title ('' for none)")
    b.add_argument("--text-field", default="text", help="field holding the document text")
    b.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    b.add_argument("--max-docs", type=int, default=None, help="index only the first N documents (for a trial)")
    b.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="the decoder's tokenizer: alias or path "
                   "(neighbour tokens are in its vocabulary)")
    b.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers model: alias or path")
    b.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk (a neighbour is 2 chunks)")
    b.add_argument("--no-title", action="store_true", help="embed chunk text only, without the document title")
    b.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    b.add_argument("--shard-size", type=int, default=8192, help="chunks per embedding shard (unit of resumption)")
    b.add_argument("--device", default=None, help="embedder device, e.g. cpu or cuda:0 (default: automatic)")
    b.add_argument("--devices", default=None, help="comma-separated devices for a multi-process embedding pool "
                   "(default: all GPUs when there are several)")
    b.add_argument("--factory", default="auto", help="faiss.index_factory string, e.g. Flat or IVF4096,Flat "
                   "(default: chosen from the number of chunks and --memory-budget-gb)")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: tuned for 0.95 recall@10)")
    b.add_argument("--memory-budget-gb", type=float, default=8.0, help="memory for the stored vectors")
    b.add_argument("--flat-threshold", type=int, default=100_000, help="exact search up to this many chunks")
    b.add_argument("--overwrite", action="store_true", help="delete an existing index or partial build first")
    b.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="while another build of the same "
                   "directory runs, wait this long for it (-1: as long as it takes) instead of stopping")
    b.add_argument("--retriever", default="dense", choices=["dense", "bm25", "hybrid"],
                   help="bm25 or hybrid also builds a BM25 index over the same chunks (bm25/)")
    b.add_argument("--bm25-k1", type=float, default=1.2, help="BM25 k1")
    b.add_argument("--bm25-b", type=float, default=0.75, help="BM25 b")
    b.add_argument("--query-embedder", default=None, help="separate query encoder (DPR, Dragon+): alias or path; "
                   "--embedder then encodes the documents")
    b.add_argument("--query-prompt", default=None, help="text prepended to queries (E5: 'query: '); default: the "
                   "query encoder's own prompt")
    b.add_argument("--document-prompt", default=None, help="text prepended to chunks (E5: 'passage: '); default: "
                   "the embedder's own document prompt")
    b.add_argument("--normalize", default="auto", choices=["auto", "yes", "no"], help="L2-normalise vectors (auto: "
                   "as the embedder's sentence-transformers config does)")
    b.add_argument("--pooling", default=None, help="replace the encoders' pooling, e.g. cls for DPR (default: "
                   "the model's own)")
    b.add_argument("--on-disk", default="auto", choices=["auto", "yes", "no"], help="IVF-PQ with inverted lists "
                   "on disk (auto: when the vectors exceed --memory-budget-gb)")
    b.add_argument("--opq", action="store_true", help="on-disk index: OPQ rotation before PQ")
    b.set_defaults(func=cmd_build)

    def query_side(sp):
        sp.add_argument("--index", required=True, help="index directory, or NAME for indexes/NAME")
        sp.add_argument("--embedder", default=None, help="override the embedder recorded in the index (must match)")
        sp.add_argument("--tokenizer", default=None, help="check the index against this tokenizer (alias or path)")
        sp.add_argument("--chunk-size", type=int, default=None, help="refuse the index unless built with this size")
        sp.add_argument("--nprobe", type=int, default=None, help="override the index's nprobe (IVF only)")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.add_argument("--verify", action="store_true", help="check the checksum of every file of the index "
                        "(by default: files up to 1 GiB at every load, bigger ones once after they change; sizes "
                        "and counts always)")
        sp.add_argument("--pooling", default=None, help="replace the query encoder's pooling (must match the index)")
        sp.add_argument("--fusion", default="rrf", choices=["rrf", "score"], help="hybrid: reciprocal-rank fusion "
                        "or normalised score combination")
        sp.add_argument("--fusion-weights", default="dense=1,bm25=1", help="hybrid: weight of each retriever")
        sp.add_argument("--rrf-k", type=int, default=60, help="hybrid rrf: rank offset")
        sp.add_argument("--fusion-normalisation", default="minmax", choices=["minmax", "zscore"],
                        help="hybrid score: per-query normalisation")
        sp.add_argument("--fusion-depth", type=int, default=100, help="hybrid: candidates from each retriever")
        sp.add_argument("--rerank", default=None, help="cross-encoder (HF id or path) that reorders the top "
                        "--rerank-depth chunks")
        sp.add_argument("--rerank-depth", type=int, default=100, help="chunks reranked per query")

    kinds = ["dense", "bm25", "hybrid"]

    s = sub.add_parser("search", help="print the top-k chunks for one or more queries", formatter_class=fmt)
    query_side(s)
    s.add_argument("--retriever", default="dense", choices=kinds, help="dense, bm25 or hybrid (the index needs "
                   "bm25/ for the last two)")
    s.add_argument("queries", nargs="+", help="query texts")
    s.add_argument("--k", type=int, default=5)
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("eval", help="retrieval quality on BEIR qrels or a QA JSONL", formatter_class=fmt,
                       description="Evaluate an index: --beir for nDCG@10/recall@k/MRR@10 against qrels (documents "
                       "score their best chunk), or --qa for gold-passage and answer-string recall@k.")
    query_side(e)
    e._option_string_actions["--index"].nargs = "+"
    e._option_string_actions["--index"].help = "index directory or NAME; several, one per --beir folder"
    e.add_argument("--retriever", nargs="+", default=["dense"], choices=kinds, help="one or more of dense, bm25, "
                   "hybrid: one table row per dataset and retriever")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--beir", nargs="+", help="BEIR folder(s): corpus.jsonl, queries.jsonl, qrels/<split>.tsv "
                     "(prints nDCG@10, recall@k, MRR@10)")
    src.add_argument("--qa", help="QA JSONL with a question, its answers and its gold passage id(s) (prints "
                     "passage recall@k: a gold passage among the top-k distinct documents, the chunks of one "
                     "document counting once; answer recall@k: an answer string in one of the top-k chunks)")
    e.add_argument("--split", default="test", help="qrels split for --beir")
    e.add_argument("--k", type=int, default=100, help="recall cut-off for --beir")
    e.add_argument("--chunk-depth", type=int, default=None, help="chunks retrieved per query before documents are "
                   "scored by their best chunk (default 10 k)")
    e.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20], help="cut-offs for --qa")
    e.add_argument("--question-field", default="question", help="--qa field holding the question")
    e.add_argument("--answers-field", default="answers", help="--qa field holding the answers (a string, a list, "
                   "or SQuAD's {text: [...]})")
    e.add_argument("--passage-field", default="passage_id", help="--qa field holding the gold passage: a document "
                   "id of the index or a list of them (a hit on any counts), e.g. gold_passage_ids")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    e.set_defaults(func=cmd_eval)

    n = sub.add_parser("neighbours", help="precompute neighbours of a JSONL dataset into memmaps for training",
                       formatter_class=fmt)
    query_side(n)
    n.add_argument("--retriever", default="dense", choices=kinds, help="first stage that finds the neighbours")
    n.add_argument("--input", required=True, help="JSONL dataset")
    n.add_argument("--field", default="text", help="field whose text retrieves")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--k", type=int, default=2, help="neighbours per query")
    n.add_argument("--per-example", action="store_true", help="one query per example instead of one per chunk")
    n.add_argument("--exclude-field", default=None, help="field naming the corpus document to exclude (leakage)")
    n.set_defaults(func=cmd_neighbours)

    lx = sub.add_parser("lexical", help="add a BM25 index over the chunks of a finished index", formatter_class=fmt)
    lx.add_argument("--index", required=True, help="index directory, or NAME for indexes/NAME")
    lx.add_argument("--k1", type=float, default=1.2)
    lx.add_argument("--b", type=float, default=0.75)
    lx.add_argument("--no-title", action="store_true", help="index chunk text only, without the document title")
    lx.add_argument("--overwrite", action="store_true", help="replace a BM25 index built with other settings")
    lx.set_defaults(func=cmd_lexical)

    i = sub.add_parser("info", help="print an index's manifest (and check its files with --verify)")
    i.add_argument("--index", required=True)
    i.add_argument("--verify", action="store_true", help="check every file's size and checksum")
    i.set_defaults(func=cmd_info)
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from retrieval.errors import expected_errors, run_cli

    from retrieval.distributed import leave_process_group

    try:
        return run_cli(args.func, args, expected_errors(), debug=args.debug)
    finally:
        leave_process_group()


if __name__ == "__main__":
    from retrieval.distributed import exit_process

    exit_process(main())
