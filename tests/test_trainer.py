"""The shared training loop on a tiny decoder: resume equals an uninterrupted run, NaN stops cleanly, loss falls."""
import json

import pytest
import torch

from conftest import build_tiny_lm
from tiny_fit_run import collate, data
from retrotune.config import TrainConfig
from retrotune.trainer import NonFiniteLossError, fit, latest_checkpoint




def _loss(model, batch):
    return model(**batch).loss


def _model():
    model = build_tiny_lm("llama")
    for name, p in model.named_parameters():
        p.requires_grad = ".layers.3." in name  # a small trainable subset, as a PEFT method would leave
    return model


def _run(tmp_path, steps, loss_fn=_loss, **overrides):
    config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, eval_every=100, save_every=3, seed=1, **overrides)
    return fit(_model(), data(), collate, loss_fn, config, tmp_path, run_config={"model": "tiny"})


class Killed(Exception):
    pass


def test_resume_continues_the_same_loss_curve(tmp_path):
    full = _run(tmp_path / "full", 10)
    calls = {"n": 0}

    def dies_at_step_8(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Killed
        return _loss(model, batch)

    with pytest.raises(Killed):
        _run(tmp_path / "split", 10, loss_fn=dies_at_step_8)  # 24 examples / 4 = 6 batches: crosses an epoch
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-6"
    resumed = _run(tmp_path / "split", 10)
    assert [row["step"] for row in resumed.history] == list(range(1, 11))
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in full.history], abs=1e-6)


def test_short_run_lowers_the_loss(tmp_path):
    result = _run(tmp_path, 12)
    losses = [row["loss"] for row in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "learning_curve.png").stat().st_size > 0


def test_non_finite_loss_stops_with_last_checkpoint_intact(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if calls["n"] == 5 else loss

    config = TrainConfig(max_steps=8, batch_size=4, lr=1e-2, save_every=3, eval_every=100)
    with pytest.raises(NonFiniteLossError, match=r"step 5.*checkpoint-3.*intact"):
        fit(_model(), data(), collate, poisoned, config, tmp_path, run_config={"model": "tiny"})
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert json.loads((tmp_path / "checkpoint-3" / "state.json").read_text())["step"] == 3


def test_validation_and_early_stopping(tmp_path):
    def validate(model):
        return {"val_loss": 1.0}  # never improves after the first evaluation

    config = TrainConfig(max_steps=20, batch_size=4, lr=1e-3, eval_every=2, save_every=100, early_stopping_patience=2)
    result = fit(_model(), data(), collate, _loss, config, tmp_path, run_config={}, validate=validate)
    assert result.stopped_early and result.steps == 6
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"


def test_empty_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training set is empty"):
        fit(_model(), [], collate, _loss, TrainConfig(max_steps=2), tmp_path, run_config={})
