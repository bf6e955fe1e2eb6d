"""Bad inputs, one case a line: each ends with one `error: <where>: <what>; <what to do>` line and exit status 2
before any model, corpus or index is loaded, or is recovered from (a switched PEFT method, a quoted plan)."""
import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import eval as eval_cli
import train
from retrieval.__main__ import main as retrieval_main
from retrotune.config import ConfigError, load_config

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "finetune_gpt_lora.yaml")


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    """Any model or corpus load fails the test: every check below must come first."""
    import backbones
    import backbones.resolve
    import retrieval.corpus
    import retrotune.assemble
    import retrotune.models
    import retrotune.neighbours

    def refuse(*args, **kwargs):
        raise AssertionError("a model or corpus was loaded before the inputs were checked")

    for module, names in ((backbones, ("load_decoder", "load_embedder")),
                          (backbones.resolve, ("load_decoder", "load_embedder")),
                          (retrotune.models, ("load_decoder", "load_embedder")),
                          (retrotune.assemble, ("load_decoder",)), (retrotune.neighbours, ("load_embedder",)),
                          (retrieval.corpus, ("load_corpus",))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---- train.py: config values and PEFT method vs model, before any model loads ----
TRAIN_CASES = [
    (["model=retro", "peft.method=prefix_tuning"], "peft: prefix_tuning is not available on RETRO"),
    (["peft.method=bitfit"], "peft: bitfit: the selected layers of LlamaForCausalLM have no bias parameters"),
    (["model=retro", "retro.attention=joint", "peft.targets=[attention,retro_encoder]"],
     "peft: target 'retro_encoder': this RETRO model has no trained neighbour encoder"),
    (["peft.targets=[attention,cca]"], "peft: target 'cca' needs a RETRO model"),
    (["peft.method=adapter", "peft.blocks=[decoder,retro_encoder]"], "peft: target 'retro_encoder' needs a RETRO"),
    (["peft.method=lora", "peft.train_retro=true"], "train_retro=True needs a RETRO model"),
    (["decoder=nobody-here/no-such-model"], "decoder: 'nobody-here/no-such-model' has no readable model config"),
    (["peft.method=lorax"], "method='lorax' is not a known PEFT method"),
    (["train.max_steps=0"], "train.max_steps must be a positive integer, got 0"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["learning_rate=3e-4"], "unknown top-level field(s) ['learning_rate']"),
    (["data.qa=data/nonexistent"], "data.qa: data/nonexistent: no such QA file or folder"),
    (["init_from=runs/nowhere"], "init_from: runs/nowhere holds no finished retro-fit run"),
    (["peft.r=-1"], "r=-1: must be a positive integer"),
    (["index=indexes/nowhere"], "indexes/nowhere: no index there"),
]


@pytest.mark.parametrize("overrides, message", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_refuses_before_loading(capsys, overrides, message):
    capsys.readouterr()
    err = one_error_line(capsys, train.main([CONFIG, *overrides]))
    assert message in err


def test_switching_peft_method_drops_the_old_fields():
    """The README's `train.py configs/finetune_gpt_lora.yaml peft.method=ia3 ...`: lora's r and alpha go."""
    assert load_config(CONFIG, ["peft.method=ia3"]).peft == {"method": "ia3"}
    assert load_config(CONFIG, ["peft.r=4", "peft.method=vera"]).peft == {"method": "vera", "r": 4}  # any order
    assert load_config(CONFIG, ["peft.method=lora", "peft.r=4"]).peft["alpha"] == 16  # same method: kept


# ---- task files: every field type-checked, naming file, line and field ----
def _quality_row(options):
    return {"article_id": "a1", "title": "T", "article": "Some article text.",
            "questions": [{"question": "Which?", "options": options, "gold_label": 1}]}


TASK_CASES = [
    ("quality", _quality_row("ABCD"), "line 1, question 0: field 'options' must be a list, got str 'ABCD'"),
    ("quality", _quality_row(["only one"]), "field 'options' holds 1 option(s)"),
    ("quality", _quality_row(["A", 2]), "field 'options'[1] must be a string, got int"),
    ("quality", {**_quality_row(["x", "y"]), "questions": "not a list"}, "field 'questions' must be a list"),
    ("nq_open", {"question": "Who?", "answer": "me"}, "line 1: field 'answer' must be a list, got str 'me'"),
    ("nq_open", {"question": ["Who?"], "answer": ["me"]}, "line 1: field 'question' must be a string, got list"),
    ("triviaqa", {"question": "Q?", "question_id": "t1", "answer": {"value": "v", "aliases": "vee"}},
     "field 'answer.aliases' must be a list"),
    ("qmsum", {"meeting_transcripts": "text", "general_query_list": []}, "field 'meeting_transcripts' must be a list"),
    ("narrativeqa", {"document": {"id": "d", "text": "t"}, "question": {"text": "q"}, "answers": "a"},
     "field 'answers' must be a list"),
]


@pytest.mark.parametrize("task, row, message", TASK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TASK_CASES)])
def test_task_files_are_type_checked(tmp_path, task, row, message):
    from retrotune.qa import QADataError
    from retrotune.tasks import get_task, load_examples

    file = tmp_path / "train.jsonl"
    file.write_text(json.dumps(row) + "\n")
    with pytest.raises(QADataError) as error:
        load_examples(get_task(task), str(file))
    assert str(file) in str(error.value) and message in str(error.value)


# ---- python -m retrieval: flags decided before the corpus is read or the index opened ----
RETRIEVAL_CASES = [
    (["build", "--corpus", "no-such-corpus.jsonl", "--out", "x", "--factory", "Garbage"],
     "build flags: factory 'Garbage' is not a valid faiss.index_factory string"),
    (["search", "--index", "no-such-index", "--k", "0", "query"], "--k: must be 1 or more, got 0"),
    (["search", "--index", "no-such-index", "--fusion-weights", "dense=x", "query"],
     "--fusion-weights: fusion weights 'dense=x': expected NAME=NUMBER pairs"),
    (["search", "--index", "no-such-index", "--nprobe", "0", "query"], "--nprobe: must be 1 or more"),
    (["eval", "--index", "no-such-index", "--qa", "q.jsonl", "--retriever", "dense", "bm25"],
     "--qa: several --index or --retriever values need --beir"),
    (["eval", "--index", "a", "b", "--beir", "only-one"], "--index: 2 values for 1 --beir folders"),
    (["eval", "--index", "no-such-index", "--qa", "q.jsonl", "--ks", "5", "0"], "--ks: must be 1 or more, got 0"),
    (["search", "--index", "no-such-index", "query"], "no-such-index: no manifest.json"),
    (["eval", "--index", "no-such-index", "--beir", "beir-without-queries"],
     "error: beir-without-queries: no queries.jsonl; a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/"),
    (["eval", "--index", "no-such-index", "--beir", "no-such-folder"], "error: no-such-folder: no such BEIR folder"),
]


@pytest.mark.parametrize("argv, message", RETRIEVAL_CASES, ids=[" ".join(c[0][:1] + c[0][-3:]) for c in RETRIEVAL_CASES])
def test_retrieval_flags_refused_first(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "beir-without-queries" / "qrels").mkdir(parents=True)
    (tmp_path / "beir-without-queries" / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    (tmp_path / "beir-without-queries" / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    capsys.readouterr()
    err = one_error_line(capsys, retrieval_main(argv))
    assert message in err


def _flat_index(directory: Path) -> Path:
    """An index manifest, enough for the flag checks made before the index is opened."""
    from retrieval.manifest import FORMAT_VERSION, write_manifest

    directory.mkdir()
    write_manifest(directory, {"kind": "index", "format_version": FORMAT_VERSION, "factory": "Flat"}, [])
    return directory


def test_nprobe_on_a_flat_index_is_refused(capsys, tmp_path):
    index = _flat_index(tmp_path / "flat")
    err = one_error_line(capsys, retrieval_main(["search", "--index", str(index), "--nprobe", "8", "query"]))
    assert f"--nprobe: {index} is a Flat index" in err and "drop --nprobe" in err


# ---- eval.py ----
def test_eval_checkpoint_of_an_unfinished_run(capsys, tmp_path):
    err = one_error_line(capsys, eval_cli.main(["checkpoint", str(tmp_path)]))
    assert f"{tmp_path} holds no finished run" in err


@pytest.fixture
def finished(tmp_path):
    from test_sealed_runs import finished_run

    return finished_run.__wrapped__(tmp_path)


@pytest.mark.parametrize("flags, size", [(["--qa", "QA"], None), (["--qa", "QA", "--limit", "3"], 3),
                                         (["--limit", "5"], 5), ([], "kept")])
def test_eval_checkpoint_qa_scores_every_question_unless_limited(finished, capsys, monkeypatch, flags, size):
    import retrotune.cell

    seen = {}

    def fake(run, out, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        seen.update(kwargs)
        return {"n": 7, "score": 0.0}

    monkeypatch.setattr(retrotune.cell, "evaluate_run", fake)
    qa = str(finished / "questions.jsonl")
    assert eval_cli.main(["checkpoint", str(finished), *[qa if f == "QA" else f for f in flags]]) == 0
    if size == "kept":
        assert "validation_size" not in seen  # the run's own evaluation split and size
    else:
        assert seen["validation_size"] == size
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 7 and "scored n=7 questions" in captured.err


def test_run_config_keeps_an_explicit_none():
    from retrotune.cell import run_config
    from retrotune.config import RunConfig

    summary = {"config": RunConfig(data={"validation_size": 64}).to_dict()}
    assert run_config(summary, eval_qa="q.jsonl", validation_size=None).data.validation_size is None
    assert run_config(summary).data.validation_size == 64


def test_eval_checkpoint_bad_limit(finished, capsys):
    err = one_error_line(capsys, eval_cli.main(["checkpoint", str(finished), "--limit", "0"]))
    assert "--limit: must be a positive integer, got 0" in err


def test_paper_cell_then_overrides(capsys, tmp_path, monkeypatch):
    """`eval.py paper FILE --cell X key=value`: the override is an override, not a cell name."""
    import retrotune.grid

    seen = {}
    monkeypatch.setattr(retrotune.grid, "run_grid", lambda grid, cells, **kw: seen.update(grid=grid, cells=cells)
                        or {"table": "", "seconds": 0})
    name = "qasper/smollm2-135m-instruct/retro/lora"
    assert eval_cli.main(["paper", str(ROOT / "configs" / "paper.yaml"), "--cell", name,
                          f"output_dir={tmp_path / 'out'}"]) == 0
    assert seen["cells"] == [name] and seen["grid"].output_dir == str(tmp_path / "out")


# ---- --plan: every interpolated value quoted ----
def test_plan_script_quotes_every_value(tmp_path):
    from retrotune.plan import shell_script

    evil = "a$(touch pwned-name)"
    script = shell_script("paper", "grid $(touch pwned-file).yaml", ["output_dir=x;touch pwned-override"],
                          [f"t/{evil}/retro/lora", "t/b`touch pwned-tick`/gpt/lora"], "runs/$(touch pwned-out)\nid",
                          root=tmp_path, python="true")
    path = tmp_path / "plan.sh"
    path.write_text(script)
    env = {**os.environ, "RETROTUNE_ROOT": str(tmp_path)}
    env.pop("PYTHON", None)
    done = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("pwned*")), script
    assert "'t/a$(touch pwned-name)/retro/lora'" in script
    assert "runs/$(touch pwned-out)\\nid" in script  # the comment stays one line


# ---- checkpoints and finished runs: never trusted without their manifest ----
def test_checkpoint_without_manifest_is_refused(tmp_path):
    from retrieval.integrity import IntegrityError
    from retrotune.trainer import verify_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(IntegrityError, match="manifest.json: missing, so the files of this checkpoint cannot be "
                                             "checked and are not read"):
        verify_checkpoint(tmp_path / "checkpoint-3")


@pytest.mark.parametrize("entry", ["train", "open_index"])
def test_build_hints_are_shell_quoted(capsys, tmp_path, entry):
    from retrotune.config import RunConfig
    from retrotune.neighbours import open_index

    index = tmp_path / "my index"
    if entry == "train":
        err = one_error_line(capsys, train.main([CONFIG, f"index={index}"]))
    else:
        with pytest.raises(FileNotFoundError) as error:
            open_index(RunConfig(index=str(index)), tokenizer=None)
        err = str(error.value)
    assert f"--out '{index}'" in err


# ---- corpus and question files: a malformed line is named with its column, a BEIR file with BEIR's fields ----
READ_CASES = [
    ("corpus", "c.jsonl", '{"id": "a", "text": "x"\n',
     "c.jsonl:1: malformed JSON (Expecting ',' delimiter at the end of the line (column 24))"),
    ("corpus", "c.jsonl", '{"id": "a" "text": "x"}\n', "c.jsonl:1: malformed JSON (Expecting ',' delimiter at column 12)"),
    ("qa", "q.jsonl", '{"question": "Who?", "answers": ["me"]\n',
     "q.jsonl, line 1: not valid JSON (Expecting ',' delimiter at the end of the line (column 39))"),
    ("beir", "b/corpus.jsonl", '{"id": "d1", "title": "", "text": "x"}\n',
     "field '_id' is missing (fields present: ['id', 'text', 'title']); a BEIR corpus.jsonl names its fields '_id'"),
]


@pytest.mark.parametrize("reader, name, content, message", READ_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(READ_CASES)])
def test_file_errors_name_the_place_and_the_remedy(tmp_path, reader, name, content, message):
    from retrieval.corpus import CorpusError, read_beir, read_jsonl
    from retrotune.qa import QADataError, load_qa

    file = tmp_path / name
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(content)
    read = {"corpus": lambda: read_jsonl(file), "qa": lambda: load_qa(str(file)),
            "beir": lambda: read_beir(file.parent)}[reader]
    with pytest.raises((CorpusError, QADataError)) as error:
        read()
    assert message in str(error.value)
    assert "pass --id-field" not in str(error.value)  # a BEIR folder ignores --id-field


# ---- chunking: documents of blanks get no chunk, and are counted ----
class CharTokenizer:
    """One token per character, whitespace included (as byte-level BPE tokenizers do)."""

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False, verbose=False):
        encoded = {"input_ids": [[ord(c) % 90 for c in text] for text in texts]}
        if return_offsets_mapping:
            encoded["offset_mapping"] = [[(i, i + 1) for i in range(len(text))] for text in texts]
        return encoded


@pytest.mark.parametrize("texts, chunked", [([" \n\t ", "real text", ""], [1]), (["  ", "\n", ""], None)],
                         ids=["some-blank", "all-blank"])
def test_blank_documents_get_no_chunk(capsys, texts, chunked):
    from retrieval.chunks import chunk_documents
    from retrieval.corpus import CorpusError, Document

    docs = [Document(f"d{i}", "", text) for i, text in enumerate(texts)]
    if chunked is None:
        with pytest.raises(CorpusError, match="every text is empty or only whitespace"):
            chunk_documents(docs, CharTokenizer(), 4, progress=False)
        return
    records = chunk_documents(docs, CharTokenizer(), 4, progress=False)
    assert sorted(set(records.doc.tolist())) == chunked and records.empty_documents == 2
    assert "2 of 3 documents are empty or only whitespace and get no chunk (e.g. document 'd0')" in capsys.readouterr().err


# ---- index builds: the lock file beside the index goes when the build ends, however it ends ----
@pytest.mark.parametrize("ending", ["finished", "failed"])
def test_build_lock_file_is_removed(tmp_path, ending):
    from retrieval.build import build_lock, lock_path

    out = tmp_path / "index"
    with pytest.raises(RuntimeError) if ending == "failed" else contextlib.nullcontext():
        with build_lock(out):
            assert lock_path(out).exists()
            if ending == "failed":
                raise RuntimeError("the build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with build_lock(out):  # and the next build takes the lock again
        assert lock_path(out).exists()


# ---- a damaged bm25/ blocks BM25 search only, and names the command that rebuilds just it ----
def _index_with_bm25(directory: Path, recorded: str) -> Path:
    """An index whose bm25/ files are recorded in the index manifest (`recorded="index"`, a build with --retriever
    bm25) or in bm25/manifest.json (`"own"`, added by `python -m retrieval lexical`); bm25/ then loses a byte."""
    from retrieval.manifest import FORMAT_VERSION, write_manifest

    (directory / "bm25" / "index").mkdir(parents=True)
    (directory / "index.faiss").write_bytes(b"vectors")
    (directory / "bm25" / "index" / "scores.npy").write_bytes(b"bm25 scores")
    names = ["index.faiss"]
    if recorded == "own":
        write_manifest(directory / "bm25", {"kind": "bm25", "format_version": FORMAT_VERSION}, ["index/scores.npy"])
    else:
        names.append("bm25/index/scores.npy")
    write_manifest(directory, {"kind": "index", "format_version": FORMAT_VERSION, "factory": "Flat"}, names)
    (directory / "bm25" / "index" / "scores.npy").write_bytes(b"bm25 score")
    return directory


@pytest.mark.parametrize("retriever, recorded", [("dense", "index"), ("dense", "own"), ("bm25", "index"),
                                                 ("hybrid", "own")])
def test_damaged_bm25_blocks_only_bm25(capsys, tmp_path, retriever, recorded):
    from retrieval.manifest import read_manifest, verify_directory

    index = _index_with_bm25(tmp_path / "idx", recorded)
    if retriever == "dense":
        verify_directory(index, read_manifest(index), True, retriever="dense")  # dense search goes on
        return
    err = one_error_line(capsys, retrieval_main(["search", "--index", str(index), "--retriever", retriever, "q"]))
    assert f"{index / 'bm25'}" in err and f"python -m retrieval lexical --index {index} --overwrite" in err
    assert "retrieval build" not in err


# ---- eval.py experiment: every PEFT entry against every model of the grid, before anything loads ----
EXPERIMENT_CASES = [
    ("[{method: prefix_tuning}]", "peft[0] ('prefix_tuning' on model retro): prefix_tuning is not available on RETRO"),
    ("[{method: lora}, {method: bitfit}]", "peft[1] ('bitfit' on model gpt): bitfit: the selected layers of"),
    ("[{method: lora, targets: [attention, cca]}]", "peft[0] ('lora' on model gpt): target 'cca' needs a RETRO model"),
]


@pytest.mark.parametrize("peft, message", EXPERIMENT_CASES, ids=[c[0] for c in EXPERIMENT_CASES])
def test_experiment_peft_entries_fit_every_model(capsys, tmp_path, peft, message):
    file = tmp_path / "exp.yaml"
    file.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [gpt, retro]\npeft: {peft}\n")
    capsys.readouterr()
    err = one_error_line(capsys, eval_cli.main(["experiment", str(file)]))
    assert f"{file}: {message}" in err
    assert not (tmp_path / "out").exists()
