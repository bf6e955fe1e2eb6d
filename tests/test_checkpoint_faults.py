"""Checkpoints under faults: a damaged latest checkpoint falls back to the newest intact one (and says so), kill -9
then resume equals the uninterrupted run, and two same-seed runs give identical losses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_fit_run as tiny
from retrieval.integrity import IntegrityError
from retrotune.config import TrainConfig
from retrotune.trainer import CheckpointError, checkpoints, fit, latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).parents[1]


def _fit(out, steps, loss_fn=None, **overrides):
    config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, eval_every=100, save_every=3, seed=1, **overrides)
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    return fit(tiny.model(), tiny.data(), tiny.collate, loss_fn, config, out, run_config={"model": "tiny"})


class Stop(Exception):
    pass


def _interrupted(out, steps=9, at_call=7):
    """The 9-step run stopped in step 7: checkpoint-3 and checkpoint-6 are on disk (same schedule as the full run)."""
    calls = {"n": 0}

    def stops(m, b):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Stop
        return m(**b).loss

    with pytest.raises(Stop):
        _fit(out, steps, loss_fn=stops)


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _fit(out, 9)
    return _losses(out)


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "state.json"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, uninterrupted, name):
    _interrupted(tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-3"]
    _truncate(tmp_path / "checkpoint-6" / name)
    with pytest.raises(IntegrityError, match=name):
        verify_checkpoint(tmp_path / "checkpoint-6")
    capsys.readouterr()
    result = _fit(tmp_path, 9)
    err = capsys.readouterr().err
    assert f"checkpoint-6 ({tmp_path / 'checkpoint-6' / name}" in err
    assert f"Resuming from {tmp_path / 'checkpoint-3'} (step 3)" in err
    assert [row["step"] for row in result.history] == list(range(1, 10))  # steps 4-6 retrained, not doubled
    assert [row["loss"] for row in result.history] == uninterrupted
    assert latest_checkpoint(tmp_path).name == "checkpoint-9"


def test_checkpoint_without_manifest_is_refused_not_read(tmp_path, capsys, uninterrupted):
    """A checkpoint without a manifest (written by hand, or by another version) is never trusted: resuming skips it,
    says why, and continues from the newest sealed one."""
    _interrupted(tmp_path)
    (tmp_path / "checkpoint-6" / "manifest.json").unlink()
    result = _fit(tmp_path, 9)
    err = capsys.readouterr().err
    assert "checkpoint-6" in err and "manifest.json: missing" in err and "Resuming from" in err
    assert [row["loss"] for row in result.history] == uninterrupted


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(tmp_path):
    _interrupted(tmp_path)
    for checkpoint in checkpoints(tmp_path):
        _truncate(checkpoint / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"every checkpoint is damaged .*checkpoint-6.*checkpoint-3.*delete"):
        _fit(tmp_path, 9)


def test_edited_checkpoint_manifest_is_refused(tmp_path):
    _fit(tmp_path, 3)
    path = tmp_path / "checkpoint-3" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["step"] = 30
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="unreadable or edited"):
        verify_checkpoint(tmp_path / "checkpoint-3")


def test_two_same_seed_runs_are_identical_step_by_step(tmp_path, uninterrupted):
    _fit(tmp_path / "again", 9)
    assert _losses(tmp_path / "again") == uninterrupted  # exact, not approximate
    assert torch.are_deterministic_algorithms_enabled() is False  # the mode ends with the run


def _run_process(out, steps, kill_at=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, str(ROOT / "tests" / "tiny_fit_run.py"), str(out), str(steps)]
    return subprocess.run(cmd + ([str(kill_at)] if kill_at else []), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path):
    full = _run_process(tmp_path / "full", 9)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run_process(tmp_path / "split", 9, kill_at=8)  # dies in step 8, after checkpoint-6
    assert killed.returncode == -9
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-6"
    resumed = _run_process(tmp_path / "split", 9)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # two processes, the same losses exactly
    assert len(_losses(tmp_path / "full")) == 9
