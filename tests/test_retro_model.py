"""RetroModel on tiny decoders of every family: identity at init, RETRO's causality, missing neighbours, freezing."""
import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm, open_retro
from retro import RetroConfig, default_cca_layers, retrofit

M, K, R = 4, 2, 8


def random_neighbours(B, L, seed=0, k=K, r=R):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (B, L, k, r), generator=g)  # (B, L, K, R)


def make(tiny_lm, gate=1.0, **kw):
    model = retrofit(tiny_lm, RetroConfig(chunk_size=M, num_neighbours=K, **kw))
    # a new model's CCA output projections are zero; random ones and an open gate make retrieval visible
    open_retro(model, gate)
    return model.eval()


def logits(model, ids, nb, **kw):
    with torch.no_grad():
        return model(input_ids=ids, neighbours=nb, **kw).logits


def test_config_validation_and_default_layers():
    assert default_cca_layers(30) == (26, 27, 28, 29)  # the top ceil(30 / 8) layers
    assert default_cca_layers(12) == (10, 11)
    assert default_cca_layers(4) == (1, 2, 3)
    assert RetroConfig(chunk_size=16).neighbour_length == 32
    with pytest.raises(ValueError, match="chunk_size"):
        RetroConfig(chunk_size=0)
    with pytest.raises(ValueError, match="num_neighbours"):
        RetroConfig(num_neighbours=0)
    with pytest.raises(ValueError, match="duplicates"):
        RetroConfig(cca_layers=(1, 1))
    with pytest.raises(ValueError, match="do not exist"):
        retrofit(build_tiny_lm("llama"), RetroConfig(chunk_size=M, cca_layers=(7,)))
    with pytest.raises(ValueError, match="dropout"):
        RetroConfig(dropout=1.5)


def test_initial_logits_equal_base(tiny_lm):
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M + 1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    with torch.no_grad():
        want = tiny_lm(input_ids=ids, attention_mask=mask).logits
    model = retrofit(tiny_lm, RetroConfig(chunk_size=M, num_neighbours=K)).eval()
    got = logits(model, ids, random_neighbours(2, 4), attention_mask=mask)
    assert (got - want).abs().max().item() <= 1e-5


def test_base_untouched_and_frozen(tiny_lm):
    keys = list(tiny_lm.state_dict().keys())
    model = make(tiny_lm)
    assert list(model.base.state_dict().keys()) == keys
    assert all(not p.requires_grad for p in model.base.parameters())
    added = list(model.retro_parameters())
    assert added and all(p.requires_grad for p in added)
    assert set(model.cca) == {str(i) for i in model.config.cca_layers}
    for block in model.cca.values():
        assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {n for n, _ in block.named_children()}
    names = {n for n, _ in model.encoder.layers[0].named_modules()}
    assert {"self_attn.q_proj", "cross_attn.o_proj", "mlp.up_proj", "mlp.down_proj"} <= names
    # the embedding table is shared with the decoder, not copied into the added parameters
    emb = model.get_input_embeddings().weight
    assert all(p.data_ptr() != emb.data_ptr() for p in added)


def test_neighbours_of_chunk_u_reach_only_positions_from_its_last_token(tiny_lm):
    check_chunk_reach(make(tiny_lm))


def check_chunk_reach(model):
    """Chunk u's neighbours change nothing before position (u + 1) m - 1 and something from there on."""
    T = 4 * M - 1  # not a multiple of m
    ids = torch.randint(1, TINY_VOCAB, (1, T))
    nb = random_neighbours(1, 4)
    ref = logits(model, ids, nb)
    for u in range(T // M):
        other = nb.clone()
        other[:, u] = random_neighbours(1, 1, seed=100 + u)[:, 0]
        diff = (logits(model, ids, other) - ref).abs().amax(-1)[0]  # (T,)
        first = (u + 1) * M - 1
        assert diff[:first].max().item() == 0.0, f"chunk {u} neighbours leaked before position {first}"
        assert diff[first:].max().item() > 1e-4, f"chunk {u} neighbours had no effect"


def test_future_tokens_never_change_past_logits(tiny_lm):
    check_causal(make(tiny_lm))


def check_causal(model):
    T = 3 * M + 2
    ids = torch.randint(1, TINY_VOCAB, (1, T))
    nb = random_neighbours(1, 4)
    ref = logits(model, ids, nb)
    for t in (1, M - 1, M, 2 * M + 1, T - 1):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] % (TINY_VOCAB - 1)) + 1
        diff = (logits(model, changed, nb) - ref).abs().amax(-1)[0]
        assert diff[:t].max().item() <= 1e-6, f"changing token {t} changed earlier logits"
        assert diff[t:].max().item() > 1e-4


def test_missing_neighbours_are_masked(tiny_lm):
    model = make(tiny_lm)
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    with torch.no_grad():
        base = model.base(input_ids=ids).logits
    none = torch.full((2, 3, K, R), -1)
    got = logits(model, ids, none)
    assert torch.isfinite(got).all()
    assert (got - base).abs().max().item() <= 1e-6  # nothing to attend: CCA adds exactly zero
    partly = random_neighbours(2, 3)
    partly[0, 0] = -1
    partly[1, :, 1, R // 2:] = -1
    out = logits(model, ids, partly)
    assert torch.isfinite(out).all()
    assert (out[0, :2 * M - 1] - base[0, :2 * M - 1]).abs().max().item() <= 1e-6
    # neighbours=None is the base model
    assert (logits(model, ids, None) - base).abs().max().item() == 0.0


def test_neighbour_shape_errors(tiny_lm):
    model = make(tiny_lm)
    ids = torch.randint(1, TINY_VOCAB, (1, 3 * M))
    with pytest.raises(ValueError, match="cover 2 chunks"):
        model(input_ids=ids, neighbours=random_neighbours(1, 2))
    with pytest.raises(ValueError, match="neighbour_length"):
        model(input_ids=ids, neighbours=random_neighbours(1, 3, r=4 * M))


def test_loss_trains_only_retro_parameters(tiny_lm):
    model = make(tiny_lm, gate=0.5).train()
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    out = model(input_ids=ids, neighbours=random_neighbours(2, 3), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None for p in model.base.parameters())
    grads = [p.grad for p in model.retro_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.base.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, neighbours=random_neighbours(2, 3), labels=ids)


def test_cached_forward_matches_full_forward(tiny_lm):
    check_cached_forward(make(tiny_lm))


def check_cached_forward(model):
    T = 3 * M + 1
    ids = torch.randint(1, TINY_VOCAB, (2, T))
    nb = random_neighbours(2, 4)
    full = logits(model, ids, nb)
    with torch.no_grad():
        out = model(input_ids=ids[:, :M + 1], neighbours=nb, use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        for t in range(M + 1, T, 2):  # uneven steps cross chunk boundaries mid-step
            out = model(input_ids=ids[:, t:t + 2], neighbours=nb, past_key_values=cache, use_cache=True)
            parts.append(out.logits)
    assert cache.retro_state.offset == T
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.integration
def test_retrofit_smollm2_default_layers_and_identity():
    from backbones import load_decoder

    base, tok = load_decoder("smollm2-135m")
    model = retrofit(base, RetroConfig())
    assert model.config.cca_layers == (26, 27, 28, 29)
    assert model.config.neighbour_length == 128 and model.config.encoder_width == 576
    ids = torch.tensor([tok("The Eiffel Tower is in the city of")["input_ids"] * 10])[:, :70]
    nb = torch.randint(0, len(tok), (1, 2, 2, 128))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = model(input_ids=ids, neighbours=nb).logits
    assert (got - want).abs().max().item() <= 1e-5
    open_retro(model)
    with torch.no_grad():
        moved = model(input_ids=ids, neighbours=nb).logits
    diff = (moved - want).abs().amax(-1)[0]
    assert diff[:63].max().item() <= 1e-5 and diff[63:].max().item() > 1e-3


def test_fresh_cca_continues_a_neighbour_where_two_tokens_match_and_reads_nothing_elsewhere():
    from torch.nn import functional as F

    from retro.layers import ChunkedCrossAttention

    torch.manual_seed(0)
    D, heads, m, R = 256, 4, 4, 6  # heads of width 64, as in the models CCA is built for
    cca = ChunkedCrossAttention(D, D, heads, dropout=0.0).eval()
    cca.gate.data.fill_(20.0)  # tanh = 1: the branch at full strength
    emb = torch.randn(20, D)
    neighbour = torch.tensor([1, 2, 3, 4, 5, 6])
    encoded = F.layer_norm(emb[neighbour], (D,))[None, None].expand(1, 2, R, D)  # what a fresh encoder gives
    valid = torch.ones(1, 2, R, dtype=torch.bool)
    # positions 3..7 read chunk 0's neighbour; position 5 holds token 3 after token 2, position 6 token 9 after 3
    ids = torch.tensor([[10, 11, 12, 13, 2, 3, 9, 14]])
    hidden = torch.ones(1, 8, D)
    previous = torch.cat([torch.zeros(1, 1, D), emb[ids[:, :-1]]], dim=1)
    out = cca(hidden, encoded, valid, offset=0, chunk_size=m, neighbour_length=R, tokens=emb[ids], previous=previous)
    read = (out - hidden)[0]  # (8, D); the residual RMS is 1
    half = D // 2  # the induction heads' output dims, an identity copy of the value they attend
    copied = F.cosine_similarity(read[5, :half], encoded[0, 0, 3, :half], dim=0)
    assert copied > 0.99, f"did not continue '2 3' with token 4 (cosine {copied:.3f})"
    assert read[6, :half].norm() < 0.01 * read[5, :half].norm(), "one shared token is no match: the null slot wins"
    assert read[:3].abs().max() == 0.0  # before the first chunk ends nothing is read
