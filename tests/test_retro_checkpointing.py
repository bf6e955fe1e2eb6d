"""Gradient checkpointing of RETRO (base layers, CCA blocks, neighbour encoder): the same gradients as without it,
less kept for the backward pass, and a clear refusal when it is switched on for the base alone."""
import copy

import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm, open_retro
from retro import RetroConfig, retrofit

M, K = 4, 2


def _batch(seed=0, B=2, L=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (B, L * M), generator=g)  # (B, T)
    neighbours = torch.randint(0, TINY_VOCAB, (B, L, K, 2 * M), generator=g)  # (B, L, K, R)
    neighbours[1, 2] = -1  # a chunk without neighbours
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask, "neighbours": neighbours, "labels": ids}


def _model(family, dropout):
    model = open_retro(retrofit(build_tiny_lm(family), RetroConfig(chunk_size=M, num_neighbours=K, dropout=dropout)))
    for p in model.parameters():
        p.requires_grad_(True)  # gradients through the (checkpointed) base layers are compared too
    return model.train()


def _step(model, batch, seed=1):
    """Loss and gradients of one forward + backward, and the bytes autograd kept outside checkpointed regions."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_gradients(tiny_family, dropout):
    plain = _model(tiny_family, dropout)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.is_gradient_checkpointing and ckpt.base.is_activation_checkpointing
    batch = _batch()
    loss, grads, kept = _step(plain, batch)
    loss_c, grads_c, kept_c = _step(ckpt, batch)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys()
    assert {n for n in grads if n.startswith(("cca.", "encoder."))}  # the added layers are among them
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=1e-6, msg=name)
    assert kept_c < kept / 2  # the recomputed regions keep nothing for the backward pass

    ckpt.gradient_checkpointing_disable()
    assert not ckpt.is_gradient_checkpointing and not ckpt.base.is_activation_checkpointing


def test_checkpointing_the_base_alone_is_refused():
    model = _model("llama", 0.0)
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="RetroModel.gradient_checkpointing_enable"):
        model(**_batch())
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_generation_is_unchanged_under_checkpointing():
    """Checkpointing acts only when a backward pass follows: cached generation in eval mode is untouched."""
    from retro.generate import generate

    model = _model("llama", 0.0).eval()
    batch = _batch()
    want = generate(model, batch["input_ids"][:1], neighbours=batch["neighbours"][:1], max_new_tokens=5)
    model.gradient_checkpointing_enable()
    assert torch.equal(generate(model, batch["input_ids"][:1], neighbours=batch["neighbours"][:1],
                                max_new_tokens=5), want)


def test_training_loop_with_checkpointing_logs_the_same_losses(tmp_path):
    from retrotune.config import TrainConfig
    from retrotune.trainer import fit

    data = [{k: v[i] for k, v in _batch(seed=s).items()} for s in range(4) for i in range(2)]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def run(checkpointing):
        model = _model("llama", 0.1)
        config = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, eval_every=100, save_every=100, seed=1,
                             gradient_checkpointing=checkpointing)
        result = fit(model, data, collate, lambda m, b: m(**b).loss, config, tmp_path / str(checkpointing),
                     run_config={"model": "tiny"})
        return [row["loss"] for row in result.history]

    assert run(True) == pytest.approx(run(False), abs=1e-6)
