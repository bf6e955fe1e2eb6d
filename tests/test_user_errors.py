"""The command lines' one error path: bad config values, paths and method names end with a single
`error: <what, where, what to do>` line and exit status 2, before any model is loaded; --debug shows the traceback."""
from pathlib import Path

import pytest

import eval as eval_cli
import train
from retrotune.config import ConfigError

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "finetune_gpt_lora.yaml")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load fails the test: every check below must come first."""
    import backbones
    import backbones.resolve
    import retrotune.assemble
    import retrotune.models
    import retrotune.neighbours

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module, names in ((backbones, ("load_decoder", "load_embedder")),
                          (backbones.resolve, ("load_decoder", "load_embedder")),
                          (retrotune.models, ("load_decoder", "load_embedder")),
                          (retrotune.assemble, ("load_decoder",)), (retrotune.neighbours, ("load_embedder",))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def run_train(capsys, *overrides):
    capsys.readouterr()
    rc = train.main([CONFIG, *overrides])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.warmup_steps=abc", "train.warmup_steps must be an integer, got 'abc'"),
    ("data.train_size=abc", "data.train_size must be an integer or null, got 'abc'"),
    ("train.deterministic=sometimes", "train.deterministic must be true or false or null, got 'sometimes'"),
    ("train.max_steps=0", "train.max_steps must be a positive integer, got 0"),
])
def test_bad_values_are_one_line(capsys, override, message):
    rc, err = run_train(capsys, override)
    assert rc == 2 and err.startswith(f"error: {CONFIG}: {message}") and err.count("\n") == 1


def test_unknown_top_level_key_names_the_file_once(capsys):
    rc, err = run_train(capsys, "learning_rate=3e-4")
    assert rc == 2 and "unknown top-level field(s) ['learning_rate']" in err
    assert err.count(CONFIG) == 1


def test_missing_qa_path_is_not_sent_to_the_hub(capsys):
    rc, err = run_train(capsys, "data.qa=data/nonexistent")
    assert rc == 2 and err.startswith("error: data.qa: data/nonexistent: no such QA file or folder")
    assert "Hub" not in err


def test_unknown_peft_method_before_model_loading(capsys):
    rc, err = run_train(capsys, "peft.method=lorax")
    assert rc == 2 and "method='lorax' is not a known PEFT method; known methods: [" in err and "'lora'" in err


def test_missing_index_names_the_build_command(capsys, tmp_path):
    rc, err = run_train(capsys, f"index={tmp_path / 'nowhere'}")
    assert rc == 2 and err.startswith(f"error: {tmp_path / 'nowhere'}: no index there")
    assert f"python -m retrieval build --corpus CORPUS --out {tmp_path / 'nowhere'}" in err
    rc, err = run_train(capsys, f"index={tmp_path / 'squad-open'}")  # named like a shipped corpus: built from it
    assert f"python -m retrieval build --corpus data/squad-open/passages.jsonl --out {tmp_path / 'squad-open'}" in err


def test_unknown_decoder(capsys, tmp_path):
    rc, err = run_train(capsys, f"decoder={tmp_path / 'no-model'}")
    assert rc == 2 and "unknown decoder" in err


def test_debug_keeps_the_traceback():
    with pytest.raises(ConfigError, match="warmup_steps"):
        train.main([CONFIG, "train.warmup_steps=abc", "--debug"])


def test_eval_errors(capsys, tmp_path):
    assert eval_cli.main(["checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds no finished run")
    assert eval_cli.main(["zero-shot", CONFIG, "peft.method=nope"]) == 2
    assert "is not a known PEFT method" in capsys.readouterr().err
    assert eval_cli.main(["experiment", str(tmp_path / "missing.yaml")]) == 2
    assert "no such experiment file" in capsys.readouterr().err


def test_retrieval_and_peft_table_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.undo()  # the table loads its model by name: the name is what fails here
    from retrotune.parameter_table import main as table_main
    from retrieval.__main__ import main as retrieval_main

    assert retrieval_main(["search", "--index", str(tmp_path / "none"), "query"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none'}: no manifest.json")
    assert table_main(["--model", str(tmp_path / "no-model"), "--no-retro"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the decoder '{tmp_path / 'no-model'}' could not be loaded") and "--tiny" in err
