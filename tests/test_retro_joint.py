"""Joint CCA (RetroConfig.attention="joint") on a tiny Llama: exact at init, RETRO's causality, missing neighbours,
cached forward, training, the families it refuses, and what it reads with its gates open."""
import copy
import io
import pickle

import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm
from test_retro_model import check_cached_forward, check_causal, check_chunk_reach
from retro import RetroConfig, retrofit
from retro.joint import JointCCA

M, K, R = 4, 2, 8


def neighbours(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY_VOCAB, (B, L, K, R), generator=g)  # (B, L, K, R)


def joint(gate=None, **kw):
    kw = {"chunk_size": M, "num_neighbours": K, **kw}
    model = retrofit(build_tiny_lm("llama"), RetroConfig(attention="joint", **kw))
    if gate is not None:
        model.set_gates(gate)
    return model.eval()


def logits(model, ids, nb, **kw):
    with torch.no_grad():
        return model(input_ids=ids, neighbours=nb, **kw).logits


def test_exact_at_init_with_padding_and_cca_on_every_layer():
    model = joint()
    assert model.config.cca_layers == (0, 1, 2, 3)
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M + 1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model.base(input_ids=ids, attention_mask=mask).logits
    got = logits(model, ids, neighbours(2, 4), attention_mask=mask)
    assert (got - want).abs().max().item() == 0.0


def test_neighbours_of_chunk_u_reach_only_positions_from_its_last_token():
    check_chunk_reach(joint(gate=2.0))


def test_future_tokens_never_change_past_logits():
    check_causal(joint(gate=2.0))


def test_missing_neighbours_read_nothing():
    model = joint(gate=2.0)
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    with torch.no_grad():
        base = model.base(input_ids=ids).logits
    assert (logits(model, ids, torch.full((2, 3, K, R), -1)) - base).abs().max().item() <= 1e-5
    assert (logits(model, ids, None) - base).abs().max().item() == 0.0
    partly = neighbours(2, 3)
    partly[0, 0] = -1  # chunk 0 of row 0 has none: its window reads nothing
    out = logits(model, ids, partly)
    assert torch.isfinite(out).all()
    assert (out[0, :2 * M - 1] - base[0, :2 * M - 1]).abs().max().item() <= 1e-5
    assert (out[1, M - 1:] - base[1, M - 1:]).abs().max().item() > 1e-4


def test_cached_forward_matches_full_forward():
    check_cached_forward(joint(gate=2.0))


def test_an_open_gate_reads_a_neighbour_as_text_written_before_the_window():
    """One chunk, one neighbour, every layer joint, gates open, no bias: the positions reading the neighbour see it
    as the base sees the same tokens placed just before them (the neighbour keeps its own positions 0..R-1 in its
    pass, so compare a base run on [neighbour ; window] with positions continuing from the neighbour's)."""
    model = joint(gate=20.0, num_neighbours=1)
    nb = torch.randint(1, TINY_VOCAB, (1, 2, 1, R))
    ids = torch.randint(1, TINY_VOCAB, (1, M - 1 + 1))  # chunk 0 minus its last token, then the window's first
    got = logits(model, ids, nb)[0, -1]
    # the reference: the last position attends the neighbour and its own context; its own context in the model run
    # also includes the first M - 1 tokens, so the reference keeps them after the neighbour, at their positions
    seq = torch.cat([nb[0, 0, 0], ids[0]])[None]
    pos = torch.cat([torch.arange(R) - R + (M - 1), torch.arange(M)])[None]
    # tokens of chunk 0 (positions 0..M-2) must not see the neighbour, as in the model run
    T = seq.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[R:R + M - 1, :R] = False
    with torch.no_grad():
        want = model.base(input_ids=seq, position_ids=pos, attention_mask=allowed[None, None]).logits[0, -1]
    assert (got - want).abs().max().item() <= 1e-4


def test_training_reaches_gates_biases_and_projections_only():
    model = joint(gate=0.5).train()
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    model(input_ids=ids, neighbours=neighbours(2, 3), labels=ids).loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    named = dict(model.named_parameters())
    for layer in model.config.cca_layers:
        for name in ("gate", "bias", "k_proj.weight", "v_proj.weight"):
            grad = named[f"cca.{layer}.{name}"].grad
            assert grad is not None and grad.abs().sum() > 0, (layer, name)
    groups = model.retro_parameter_groups()
    assert sum(len(v) for v in groups.values()) == len(list(model.retro_parameters()))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_families_without_llama_attention_are_refused(family):
    with pytest.raises(ValueError, match="attention='separate'"):
        retrofit(build_tiny_lm(family), RetroConfig(chunk_size=M, attention="joint"))


def test_projections_that_are_not_plain_linear_layers_are_refused():
    class Quantised(torch.nn.Linear):  # stands in for a bitsandbytes layer
        pass

    base = build_tiny_lm("llama")
    old = base.model.layers[1].self_attn.k_proj
    base.model.layers[1].self_attn.k_proj = Quantised(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="must be torch.nn.Linear; this base has Quantised"):
        retrofit(base, RetroConfig(chunk_size=M, attention="joint"))


def test_remove_hooks_restores_the_base():
    model = joint(gate=2.0)
    base = model.base
    before = base.config._attn_implementation
    assert before.startswith("retro_joint_")
    model.remove_hooks()
    assert base.config._attn_implementation == "sdpa"
    assert not any(hasattr(layer.self_attn, "_retro_joint") for layer in base.model.layers)
    fresh = build_tiny_lm("llama")
    ids = torch.randint(1, TINY_VOCAB, (1, 2 * M))
    with torch.no_grad():
        assert (base(input_ids=ids).logits - fresh(input_ids=ids).logits).abs().max().item() == 0.0


def test_deepcopy_and_pickle_read_through_their_own_blocks():
    model = joint(gate=2.0)
    ids = torch.randint(1, TINY_VOCAB, (1, 3 * M))
    nb = neighbours(1, 3)
    ref = logits(model, ids, nb)
    twin = copy.deepcopy(model)
    assert (logits(twin, ids, nb) - ref).abs().max().item() == 0.0
    twin.set_gates(0.0)  # the copy's gates are its own: the original still reads
    assert (logits(model, ids, nb) - ref).abs().max().item() == 0.0
    assert (logits(twin, ids, nb) - logits(twin, ids, None)).abs().max().item() == 0.0
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert (logits(loaded, ids, nb) - ref).abs().max().item() == 0.0
    assert pickle.loads(pickle.dumps(model)).config.attention == "joint"


def test_state_dict_round_trip():
    model = joint(gate=2.0)
    with torch.no_grad():
        for block in model.cca.values():
            block.bias.normal_()
    state = model.retro_state_dict()
    assert not any(k.startswith("encoder.") for k in state)
    other = joint()
    other.cca.load_state_dict({k[len("cca."):]: v for k, v in state.items()})
    ids = torch.randint(1, TINY_VOCAB, (1, 3 * M))
    nb = neighbours(1, 3)
    assert (logits(other, ids, nb) - logits(model, ids, nb)).abs().max().item() == 0.0


@pytest.mark.integration
def test_smollm2_joint_retrofit_reads_its_neighbours():
    """SmolLM2 with joint CCA: exactly the base at step 0; after 8 steps that train only the added layers on demo
    passages whose chunks get themselves and their continuation as neighbour, held-out loss with true neighbours is
    clearly below the loss with another sequence's neighbours and below the base model's."""
    import json
    from pathlib import Path

    from backbones import load_decoder

    base, tok = load_decoder("smollm2-135m")
    m = 64
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "data/squad-demo/passages.jsonl").open()]
    seqs = [ids[:3 * m] for ids in (tok(r["text"])["input_ids"] for r in rows) if len(ids) >= 3 * m][:20]
    ids = torch.tensor(seqs)  # (N, 3m): two chunks read, the third is the second's continuation
    nb = torch.stack([ids[:, :2 * m], ids[:, m:3 * m]], dim=1)[:, :, None]  # (N, 2, 1, 2m): chunk + continuation
    x = ids[:, :2 * m]
    y = x.clone()
    y[:, :m] = -100  # the loss of the second chunk, the one whose positions read a neighbour
    held = slice(16, 20)
    model = retrofit(base, RetroConfig(chunk_size=m, num_neighbours=1, attention="joint"))

    def loss(rows, neighbours):
        with torch.no_grad():
            return model(input_ids=x[rows], neighbours=neighbours, labels=y[rows]).loss.item()

    with torch.no_grad():
        assert (model(input_ids=x[held], neighbours=nb[held]).logits - base(input_ids=x[held]).logits).abs().max() == 0
    groups = model.retro_parameter_groups()
    optimiser = torch.optim.Adam([{"params": groups["gate"], "lr": 1e-1},
                                  {"params": groups["cca_qk"] + groups["cca"], "lr": 1e-4}])
    model.train()
    for step in range(8):
        rows_ = torch.arange(4) + (step % 4) * 4
        model(input_ids=x[rows_], neighbours=nb[rows_], labels=y[rows_]).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    true, shuffled = loss(held, nb[held]), loss(held, nb[held].roll(1, dims=0))
    with torch.no_grad():
        plain = base(input_ids=x[held], labels=y[held]).loss.item()
    assert true < shuffled - 0.5 and true < plain - 0.5, (true, shuffled, plain)  # measured 0.99 / 1.75 / 1.79
    model.remove_hooks()


def test_neighbours_are_encoded_only_up_to_the_highest_cca_layer(monkeypatch):
    import retro.model

    model = joint(gate=2.0, cca_layers=[0, 1])
    layers = retro.model.decoder_layers(model.base)
    widths = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: widths[i].append(args[0].shape[1]))  # layers that ran
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    nb = neighbours(2, 3)
    early = logits(model, ids, nb)
    # the neighbour rows (length R) pass layer 0 only: layer 1 reads its input; the text (3m) passes every layer
    assert widths[0] == [R, 3 * M] and widths[1] == widths[2] == widths[3] == [3 * M]
    monkeypatch.setattr(retro.model, "_stop_encoding", lambda module, args: None)
    full_depth = logits(model, ids, nb)
    assert widths[3] == [3 * M, R, 3 * M]  # the patched run did encode through every layer
    assert torch.equal(early, full_depth)


def test_reused_neighbour_states_give_the_same_answers_and_encode_each_neighbour_once(monkeypatch):
    import retro.model

    model = joint(gate=2.0)
    encoded = []
    run = retro.model.RetroModel._run_neighbours
    monkeypatch.setattr(retro.model.RetroModel, "_run_neighbours",
                        lambda self, body, rows, captured: encoded.append(len(rows)) or run(self, body, rows, captured))
    ids = torch.randint(1, TINY_VOCAB, (3, 2 * M))
    nb = neighbours(3, 2)
    swapped = nb[[2, 0, 1]]  # the shuffled control: the same neighbours, other rows
    fresh = [logits(model, ids, nb), logits(model, ids, swapped)]
    assert sum(encoded) == 2 * 3 * 2 * K
    encoded.clear()
    with retro.model.reusing_neighbours(model):
        reused = [logits(model, ids, nb), logits(model, ids, swapped)]
    assert encoded == [3 * 2 * K]  # the second pass found every neighbour kept
    for want, got in zip(fresh, reused):
        assert (want - got).abs().max().item() <= 1e-6
    assert model._neighbour_states is None  # nothing is kept past the block
    encoded.clear()
    with retro.model.reusing_neighbours(model, max_bytes=0):  # no room: every pass encodes again
        logits(model, ids, nb), logits(model, ids, nb)
    assert sum(encoded) == 2 * 3 * 2 * K


def test_neighbour_states_are_not_reused_where_gradients_flow():
    import retro.model

    model = joint(gate=2.0)
    for p in model.base.parameters():
        p.requires_grad_(True)  # a PEFT method that trains the decoder: its neighbour states change every step
    ids, nb = torch.randint(1, TINY_VOCAB, (2, 2 * M)), neighbours(2, 2)
    with retro.model.reusing_neighbours(model):
        model(input_ids=ids, neighbours=nb).logits.sum().backward()
        assert not model._neighbour_states.rows
    assert any(p.grad is not None for p in retro.model.decoder_layers(model.base)[0].parameters())


def test_a_shallow_neighbour_depth_runs_the_neighbours_through_its_prefix_only():
    import retro.model

    model = joint(gate=2.0, neighbour_depth=2)
    assert model.config.cca_layers == (0, 1, 2, 3) and model.neighbour_depth == 2
    layers = retro.model.decoder_layers(model.base)
    widths = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: widths[i].append(args[0].shape[1]))
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    shallow = logits(model, ids, neighbours(2, 3))
    assert widths == {0: [R, 3 * M], 1: [R, 3 * M], 2: [3 * M], 3: [3 * M]}
    deep = joint(gate=2.0)  # same weights (seeded tiny model), every layer reads its own states
    assert not torch.allclose(shallow, logits(deep, ids, neighbours(2, 3)))
    with torch.no_grad():
        base = model.base(input_ids=ids).logits
    assert torch.equal(logits(joint(neighbour_depth=2), ids, neighbours(2, 3)), base)  # still exact at init


@pytest.mark.parametrize("fields, message", [
    ({"attention": "separate", "neighbour_depth": 2}, "applies to attention='joint' only"),
    ({"attention": "joint", "neighbour_depth": 0}, "positive int"),
])
def test_bad_neighbour_depths_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        RetroConfig(**fields)


def test_a_neighbour_depth_beyond_the_decoder_is_refused():
    with pytest.raises(ValueError, match="neighbour_depth 9 exceeds the decoder's 4 layers"):
        joint(neighbour_depth=9)


def reference_joint(block, query, key, value, allowed, scaling, base_out, nb_key, nb_value, nb_valid, offset, m):
    """One query at a time, spelled out: position p reads the neighbours of chunk (p + 1) // m - 1 (when that chunk
    exists) and its allowed own keys in one softmax, each neighbour score raised by the head's bias."""
    B, H, T, d = query.shape
    G, L = H // block.kv_heads, nb_key.shape[1]
    out = base_out.clone()
    gate = torch.tanh(block.gate)
    for b in range(B):
        for t in range(T):
            c = (offset + t + 1) // m - 1
            if not 0 <= c < L:
                continue  # no neighbours to read: the layer's own output
            for h in range(H):
                kv = h // G
                keys = torch.cat([nb_key[b, c, kv], key[b, kv]])  # (KR + S, d)
                scores = keys @ query[b, h, t] * scaling
                scores = scores + torch.cat([block.bias[h].expand(nb_key.shape[3]), scores.new_zeros(key.shape[2])])
                ok = torch.cat([nb_valid[b, c], allowed[b, t]])
                weights = torch.softmax(scores.masked_fill(~ok, float("-inf")), 0).nan_to_num(0.0)
                read = weights @ torch.cat([nb_value[b, c, kv], value[b, kv]])
                out[b, t, h] = base_out[b, t, h] + gate[h] * (read - base_out[b, t, h])
    return out


@pytest.mark.parametrize("T, S, L, offset, mask_kind", [
    (12, 12, 3, 0, "none"), (12, 12, 3, 0, "bool"), (1, 11, 2, 10, "bool"), (1, 9, 3, 8, "float"),
    (5, 14, 3, 9, "float"), (3, 3, 1, 0, "none"), (10, 10, 1, 0, "bool")])
def test_joint_attention_matches_a_per_query_reference(T, S, L, offset, mask_kind):
    """Both of JointCCA's paths (one window, and the fused call over many windows) against the spelled-out
    reference, with left padding, invalid neighbours, GQA and per-head biases; gradients too."""
    torch.manual_seed(0)
    H, kv_heads, d, m, KR, B = 4, 2, 8, 4, 6, 2
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = (torch.nn.Linear(16, n) for n in (H * d, kv_heads * d, kv_heads * d))
    block = JointCCA(attn, H, kv_heads)
    with torch.no_grad():
        block.gate.copy_(torch.linspace(0.3, 1.5, H))
        block.bias.copy_(torch.linspace(-1.0, 1.0, H))
    query = torch.randn(B, H, T, d, requires_grad=True)
    key, value = (torch.randn(B, kv_heads, S, d, requires_grad=True) for _ in range(2))
    nb_key, nb_value = (torch.randn(B, L, kv_heads, KR, d, requires_grad=True) for _ in range(2))
    nb_valid = torch.rand(B, L, KR) > 0.3
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None].repeat(B, 1, 1)
    allowed[1, :, :2] = False  # the second row is left-padded by two tokens
    mask = {"none": None, "bool": allowed[:, None],
            "float": torch.zeros(B, 1, T, S).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)}[mask_kind]
    if mask_kind == "none":
        allowed = allowed[:1].expand(B, -1, -1)
    repeat = lambda x: x.repeat_interleave(H // kv_heads, dim=1)
    scores = (query @ repeat(key).transpose(-1, -2) * d ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    base = torch.softmax(scores, -1).nan_to_num(0.0) @ repeat(value)
    base_out = base.transpose(1, 2)  # (B, T, H, d): the layer's own attention output
    args = (query, key, value, mask, d ** -0.5, base_out, nb_key, nb_value, nb_valid, offset, m)
    got = block(*args)
    want = reference_joint(block, *args[:3], allowed, *args[4:])
    real = slice(2, None) if T == S else slice(None)  # the padded row's own padding positions read nothing real
    torch.testing.assert_close(got[:, real], want[:, real], atol=1e-5, rtol=1e-5)
    inputs = (query, key, value, nb_key, nb_value, block.gate, block.bias)
    grads_got = torch.autograd.grad(got[:, real].square().sum(), inputs, retain_graph=True, allow_unused=True)
    grads_want = torch.autograd.grad(want[:, real].square().sum(), inputs, allow_unused=True)
    for g, w, x in zip(grads_got, grads_want, inputs):
        zero = torch.zeros_like(x)  # a path that never touched an input leaves its gradient None
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w, atol=1e-4, rtol=1e-4)
