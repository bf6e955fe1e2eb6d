"""Nothing in a run folder is unpickled, and nothing unchecked is read: a pickle payload planted in a checkpoint is
refused and never runs; `final/` is sealed like a checkpoint and a same-size overwrite or a truncation of one of
its files is refused before any model loads."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import tiny_fit_run as tiny
from conftest import build_tiny_lm
from retrieval.integrity import IntegrityError, seal_directory
from retrotune.config import RunConfig, TrainConfig
from retrotune.trainer import CHECKPOINT_FILES, CheckpointError, fit, load_state, save_state


class Payload:
    """Unpickling this writes a marker file: what a crafted optimizer state could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _fit(out, steps):
    config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, eval_every=100, save_every=3, seed=1)
    return fit(tiny.model(), tiny.data(), tiny.collate, lambda m, b: m(**b).loss, config, out,
               run_config={"model": "tiny"})


def _plant(path: Path, marker: Path) -> None:
    torch.save({"optimizer": Payload(marker), "scheduler": {}, "rng": {}}, path)


def test_the_payload_is_real(tmp_path):
    """The planted object does run code when unpickled: the tests below would catch an unpickling loader."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "payload.pt", marker)
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_pickle_payload_in_an_unsealed_checkpoint_never_runs(tmp_path, capsys):
    _fit(tmp_path, 3)
    planted = tmp_path / "checkpoint-6"  # newer than the real one, written by hand: no manifest
    shutil.copytree(tmp_path / "checkpoint-3", planted)
    (planted / "manifest.json").unlink()
    marker = tmp_path / "marker"
    for name in ("optimizer.pt", "optimizer.safetensors"):
        _plant(planted / name, marker)
    (planted / "state.json").write_text(json.dumps({"step": 6}))
    result = _fit(tmp_path, 9)
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "checkpoint-6" in err and "manifest.json: missing" in err and "Resuming from" in err
    assert result.steps == 9


def test_pickle_payload_sealed_into_a_checkpoint_never_runs(tmp_path):
    """The manifest's checksum is unkeyed, so whoever plants a file can reseal it: the loader itself must refuse."""
    _fit(tmp_path, 3)
    checkpoint = tmp_path / "checkpoint-3"
    marker = tmp_path / "marker"
    _plant(checkpoint / "optimizer.safetensors", marker)
    seal_directory(checkpoint, "checkpoint", CHECKPOINT_FILES, step=3)
    with pytest.raises(CheckpointError, match="every checkpoint is damaged"):
        _fit(tmp_path, 6)
    assert not marker.exists()


def test_training_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    state = {"optimizer": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "groups": [{"betas": (0.9, 0.999), "params": [0], "name": "default"}],
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["groups"] == state["groups"] and back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["optimizer"][0]["exp_avg"], state["optimizer"][0]["exp_avg"])
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    random.setstate(back["rng"]["python"])  # accepted as the original
    np.random.set_state(back["rng"]["numpy"])


@pytest.fixture
def finished_run(tmp_path):
    """A finished GPT+LoRA run folder, written by the training code's own `_write_final`."""
    from peft_methods import apply_peft, save_peft
    from retro.checkpoint import save_retro
    from retrotune.runs import _write_final

    config = RunConfig(model="gpt", output_dir=str(tmp_path / "run"))
    model = apply_peft(build_tiny_lm("gpt2"), {"method": "lora", "r": 2})
    out = Path(config.output_dir)
    out.mkdir()
    _write_final(out, model, config, {"config": config.to_dict(), "identity": {}}, save_retro, save_peft)
    return out


def _overwrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0x3C for b in data[-8:])  # tensor bytes: still a valid safetensors file, other weights
    path.write_bytes(bytes(data))


def test_final_is_sealed_and_verified(finished_run):
    from retrotune.runs import verify_final

    manifest = json.loads((finished_run / "final" / "manifest.json").read_text())
    assert manifest["kind"] == "run" and "adapter/adapter_model.safetensors" in manifest["files"]
    verify_final(finished_run)
    weights = finished_run / "final" / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    _overwrite_same_size(weights)
    assert weights.stat().st_size == size
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: its .* checksum differs"):
        verify_final(finished_run)


@pytest.mark.parametrize("damage", ["same_size", "truncated", "no_manifest"])
def test_eval_checkpoint_refuses_a_damaged_final_before_loading(finished_run, capsys, monkeypatch, damage):
    import retrotune.cell

    monkeypatch.setattr(retrotune.cell, "load_trained", lambda *a, **k: pytest.fail("loaded a damaged run"))
    weights = finished_run / "final" / "adapter" / "adapter_model.safetensors"
    if damage == "same_size":
        _overwrite_same_size(weights)
    elif damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        (finished_run / "final" / "manifest.json").unlink()
    capsys.readouterr()
    assert eval_cli.main(["checkpoint", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("manifest.json: missing" if damage == "no_manifest" else "adapter_model.safetensors") in err
    assert f"delete {finished_run / 'final'} and rerun the run's train.py command" in err


def test_init_from_a_damaged_retrofit_is_refused(finished_run):
    from retrotune.preflight import check_init_from
    from retrotune.config import ConfigError

    (finished_run / "final" / "run.json").write_text("{}")  # edited after it was sealed
    with pytest.raises(IntegrityError, match="run.json"):
        check_init_from(str(finished_run))
    with pytest.raises(ConfigError, match="holds no finished retro-fit run"):
        check_init_from(str(finished_run / "elsewhere"))
