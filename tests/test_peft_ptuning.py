"""P-tuning: chunk/neighbour alignment on RETRO (and how plain prepending breaks it), loss targets, cached decoding."""
import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm, open_retro
import peft_methods as pm

retro = pytest.importorskip("retro")

M, K, R = 4, 2, 8


def retro_model(family: str = "llama"):
    model = retro.retrofit(build_tiny_lm(family), retro.RetroConfig(chunk_size=M, num_neighbours=K))
    open_retro(model)  # make retrieval visible in the logits
    return model.eval()


def inputs(seed: int = 0, T: int = 3 * M):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (2, T), generator=g)  # (B, T)
    neighbours = torch.randint(0, TINY_VOCAB, (2, -(-T // M), K, R), generator=g)  # (B, L, K, R)
    return ids, neighbours


def first_affected(logits_a: torch.Tensor, logits_b: torch.Tensor) -> int:
    changed = (logits_a - logits_b).abs().amax(dim=(0, 2)) > 1e-6  # (T,)
    return int(changed.nonzero()[0]) if changed.any() else -1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_virtual_block_keeps_chunk_neighbour_alignment(family):
    ids, neighbours = inputs()
    other = neighbours.clone()
    other[:, 0] = (other[:, 0] + 1) % TINY_VOCAB  # new neighbours for the first real chunk only
    # Without P-tuning, chunk 0's neighbours first reach position m-1 (RETRO's causal offset).
    base = retro_model(family)
    with torch.no_grad():
        assert first_affected(base(input_ids=ids, neighbours=neighbours).logits,
                              base(input_ids=ids, neighbours=other).logits) == M - 1
    model = pm.apply_peft(retro_model(family), {"method": "ptuning", "n_virtual": 3, "encoder_hidden": 16})
    assert model.n_prefix == M  # 3 virtual tokens padded to one whole chunk
    with torch.no_grad():
        ours = model(input_ids=ids, neighbours=neighbours).logits
        assert ours.shape == (2, ids.shape[1], TINY_VOCAB)
        assert first_affected(ours, model(input_ids=ids, neighbours=other).logits) == M - 1
        # Plain prepending of the 3 virtual tokens (what peft does) shifts every chunk boundary by 3 positions:
        # chunk 0's neighbours now reach the very first real token.
        virtual = model.prompt_encoder(model.virtual_ids[None]).expand(2, -1, -1)
        embeds = torch.cat([virtual, model.get_input_embeddings()(ids)], dim=1)
        plain = [model.model(inputs_embeds=embeds, neighbours=nb).logits[:, 3:] for nb in (neighbours, other)]
        assert first_affected(*plain) == 0


@pytest.mark.parametrize("kind", ["gpt", "retro"])
def test_loss_covers_the_real_tokens_only(kind):
    ids, neighbours = inputs(seed=1)
    base = build_tiny_lm("gpt_neox") if kind == "gpt" else retro_model("gpt_neox")
    model = pm.apply_peft(base, {"method": "ptuning", "n_virtual": 5, "encoder_hidden": 16, "encoder": "lstm"})
    extra = {"neighbours": neighbours} if kind == "retro" else {}
    out = model(input_ids=ids, labels=ids, **extra)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, TINY_VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    assert model.n_prefix == (5 if kind == "gpt" else 8)


def test_plain_prepending_on_gpt():
    ids, _ = inputs(seed=2)
    model = pm.apply_peft(build_tiny_lm("gpt2"), {"method": "ptuning", "n_virtual": 3, "encoder_hidden": 16})
    with torch.no_grad():
        virtual = model.prompt_encoder(model.virtual_ids[None]).expand(2, -1, -1)
        embeds = torch.cat([virtual, model.get_input_embeddings()(ids)], dim=1)
        full = model(input_ids=ids).logits
        torch.testing.assert_close(full, model.model(inputs_embeds=embeds).logits[:, 3:])
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=2).logits, full[:, -2:])
    with pytest.raises(ValueError, match="not RETRO"):
        model(input_ids=ids, neighbours=torch.zeros(2, 3, K, R, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt", "retro"])
def test_cached_generation_matches_full_recompute(kind):
    ids, neighbours = inputs(seed=3, T=2 * M + 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    base = build_tiny_lm("llama") if kind == "gpt" else retro_model("llama")
    model = pm.apply_peft(base, {"method": "ptuning", "n_virtual": 6, "encoder_hidden": 16})
    extra = {"neighbours": neighbours} if kind == "retro" else {}
    cached = retro.generate(model, ids, attention_mask=mask, max_new_tokens=2 * M, use_cache=True, **extra)
    full = retro.generate(model, ids, attention_mask=mask, max_new_tokens=2 * M, use_cache=False, **extra)
    assert cached.shape == (2, 2 * M)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("method", ["ptuning", "prompt_tuning"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_virtual_slots_are_masked_on_retro(method, family):
    ids, neighbours = inputs(seed=4)
    config = {"method": method, "n_virtual": 3, **({"encoder_hidden": 16} if method == "ptuning" else {})}
    model = pm.apply_peft(retro_model(family), config)
    assert model.n_prefix == M and int(model.prefix_mask(ids, 1).sum()) == 3  # one pad slot, 3 real tokens
    gpt = pm.apply_peft(build_tiny_lm(family), config)
    assert gpt.n_prefix == 3 and int(gpt.prefix_mask(ids, 1).sum()) == 3  # GPT attends to the same 3

    with torch.no_grad():
        want = model(input_ids=ids, neighbours=neighbours).logits
        clean = model.virtual_embeddings

        def with_pad(fill):
            def embeddings(batch):
                out = clean(batch).clone()  # (B, P, D), pad slots first
                out[:, :M - 3] = fill(out[:, :M - 3])
                return out
            return embeddings

        for fill in (lambda pad: torch.randn_like(pad) * 10, lambda pad: torch.full_like(pad, 3.0)):
            model.virtual_embeddings = with_pad(fill)
            torch.testing.assert_close(model(input_ids=ids, neighbours=neighbours).logits, want, rtol=0, atol=1e-5)
            mask = torch.ones_like(ids)
            mask[1, :2] = 0  # with a left-padded row too
            model.virtual_embeddings = clean
            masked = model(input_ids=ids, neighbours=neighbours, attention_mask=mask).logits
            model.virtual_embeddings = with_pad(fill)
            torch.testing.assert_close(model(input_ids=ids, neighbours=neighbours, attention_mask=mask).logits,
                                       masked, rtol=0, atol=1e-5)
        # the real virtual tokens do matter
        shift = torch.randn(1, M, 32, generator=torch.Generator().manual_seed(5))  # not constant: LayerNorm removes that
        model.virtual_embeddings = lambda batch: clean(batch) + shift
        assert not torch.allclose(model(input_ids=ids, neighbours=neighbours).logits, want, atol=1e-3)
