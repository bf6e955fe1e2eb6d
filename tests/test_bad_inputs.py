"""Bad inputs, one case a line: each ends with one `error: <where>: <what>; <what to do>` line and exit status 2
before any model, corpus or index is loaded, or is recovered from (a switched PEFT method, a quoted plan)."""
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
]


@pytest.mark.parametrize("argv, message", RETRIEVAL_CASES, ids=[" ".join(c[0][:1] + c[0][-3:]) for c in RETRIEVAL_CASES])
def test_retrieval_flags_refused_first(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
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


def test_index_hint_is_shell_quoted(capsys, tmp_path):
    index = tmp_path / "my index"
    err = one_error_line(capsys, train.main([CONFIG, f"index={index}"]))
    assert f"--out '{index}'" in err
