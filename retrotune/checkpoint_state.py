"""Training state <-> one safetensors file, without pickle: the optimiser, scheduler and RNG states of a checkpoint
(nested dicts, lists, tuples, numbers, strings, tensors and numpy arrays) -> the tensors by position, and the rest
as a typed JSON outline in the file's metadata. Reading it back runs no code from the file: a crafted one can fail
to load (CheckpointError) but never execute anything.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def rng_state() -> dict:
    """The state of every random generator a training step draws from (python, numpy, torch, each CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured, so a resumed run draws the same numbers as an uninterrupted one."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(state: dict, path: Path) -> None:
    """Write nested training state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as one
    safetensors file: the tensors by position, the rest as a JSON outline in its metadata. `load_state` reads it
    back without unpickling anything."""
    tensors: dict[str, torch.Tensor] = {}
    outline = _outline(state, tensors)
    save_file(tensors, str(path), metadata={"outline": json.dumps(outline)})


def load_state(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        outline = json.loads((handle.metadata() or {}).get("outline", "null"))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        return _from_outline(outline, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: not a training state written by this version ({error!r})") from None


def _outline(obj, tensors: dict) -> object:
    """Each value tagged with its type ({"tensor": key}, {"dict": [[key, value], ...]}, ...), so that tuples,
    integer keys and arrays come back as they were."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"dict": [[_outline(k, tensors), _outline(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_outline(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _from_outline(node, tensors: dict):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and set(node) == {"ndarray", "dtype"} and np.dtype(node["dtype"]).kind in "biuf":
        return np.asarray(node["ndarray"], dtype=np.dtype(node["dtype"]))
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected entry {str(node)[:80]}")
    (tag, value), = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "dict":
        return {_from_outline(k, tensors): _from_outline(v, tensors) for k, v in value}
    if tag in ("list", "tuple"):
        items = [_from_outline(v, tensors) for v in value]
        return tuple(items) if tag == "tuple" else items
    raise ValueError(f"unknown entry {tag!r}")
