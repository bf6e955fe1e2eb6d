"""Every PEFT method on GPT and RETRO over the tiny families: ownership, no-op at init, save/load, merge."""
import pytest
import torch

from conftest import TINY_FAMILIES, TINY_VOCAB, build_tiny_lm, open_retro
import peft_methods as pm

retro = pytest.importorskip("retro")

M, K, R = 4, 2, 8
ZERO_INIT = ("lora", "dora", "rslora", "vera", "ia3", "adapter", "loretta_adp", "loretta_rep", "bitfit", "full")
# Combinations a method refuses, with the reason it gives (tested below); every other one must work.
REFUSED = {("bitfit", "llama"): "no bias parameters", ("prefix_tuning", "retro"): "not available on RETRO",
           ("prefix_tuning", "retro_joint"): "not available on RETRO"}
# RETRO kinds: "retro" (separate CCA and a trained encoder) on every family, "retro_joint" on Llama only
KINDS = {"gpt": TINY_FAMILIES, "retro": TINY_FAMILIES, "retro_joint": ("llama",)}


def method_config(method: str, kind: str) -> dict:
    """A small configuration of each method; on RETRO it also reaches the added modules where it can (joint CCA
    has no encoder of its own)."""
    on_retro = kind.startswith("retro")
    configs = {
        "lora": {"r": 4, "targets": ["attention", "mlp"] + (["cca"] if on_retro else [])
                 + (["retro_encoder"] if kind == "retro" else [])},
        "dora": {"r": 4, "targets": ["attention", "mlp"] + (["cca"] if on_retro else [])},
        "rslora": {"r": 4, "targets": ["attention_qv", "mlp"]},
        "vera": {"r": 8, "targets": ["attention"] + (["cca"] if on_retro else [])},
        "ia3": {"targets": ["attention", "mlp_out"] + (["cca"] if on_retro else [])},
        "ptuning": {"n_virtual": 3, "encoder_hidden": 16},
        "prompt_tuning": {"n_virtual": 3},
        "prefix_tuning": {"n_virtual": 3},
        "adapter": {"bottleneck": 8, "blocks": ["decoder"] + (["retro_encoder"] if kind == "retro" else [])},
        "loretta_adp": {"bottleneck": 8, "tt_rank": 3,
                        "blocks": ["decoder"] + (["retro_encoder"] if kind == "retro" else [])},
        "loretta_rep": {"r": 4, "tt_rank": 3, "targets": ["attention", "mlp"] + (["cca"] if on_retro else [])},
        "bitfit": {"train_norms": True},
        "full": {},
    }
    return {"method": method, **configs[method]}


def build_base(kind: str, family: str, seed: int = 0) -> torch.nn.Module:
    lm = build_tiny_lm(family, seed=seed)
    if kind == "gpt":
        return lm
    if kind == "retro_joint":
        model = retro.retrofit(lm, retro.RetroConfig(chunk_size=M, num_neighbours=K, attention="joint"))
        model.set_gates(0.5)
        return model.eval()
    model = retro.retrofit(lm, retro.RetroConfig(chunk_size=M, num_neighbours=K))
    open_retro(model, 0.5)  # open the gates so retrieval (and adapters on CCA/encoder) shape the outputs
    return model.eval()


def batch(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (2, 10), generator=g)  # (B, T)
    out = {"input_ids": ids, "labels": ids}
    if kind.startswith("retro"):
        out["neighbours"] = torch.randint(0, TINY_VOCAB, (2, 3, K, R), generator=g)  # (B, L, K, R)
    return out


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def perturb(model, seed: int = 1) -> None:
    """Move every owned parameter away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in pm.owned_parameters(model):
            param.add_(0.1 * torch.randn(param.shape, generator=g))


CASES = [(m, k, f) for m in pm.known_methods() for k, families in KINDS.items() for f in families
         if (m, k) not in REFUSED and (m, f) not in REFUSED]
IDS = [f"{m}-{k}-{f}" for m, k, f in CASES]


@pytest.mark.parametrize("method,kind,family", CASES, ids=IDS)
def test_only_owned_parameters_train(method, kind, family):
    model = pm.apply_peft(build_base(kind, family), method_config(method, kind))
    model.train()
    owned = set(pm.get_record(model).owned)
    assert owned, "a method must own some parameters"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned
    if method != "full":
        assert pm.count_trainable(model)["trainable"] < pm.count_trainable(model)["total"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD(pm.trainable_parameters(model), lr=0.5)
    model(**batch(kind)).loss.backward()
    optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "one optimiser step changed nothing"
    assert changed <= owned, f"parameters outside the method changed: {sorted(changed - owned)[:5]}"


@pytest.mark.parametrize("method,kind,family", CASES, ids=IDS)
def test_answer_only_loss_is_the_full_loss(method, kind, family):
    """The loss that projects only the positions predicting an answer gives HF's loss and gradients."""
    from retro.qa import labelled_loss

    model = pm.apply_peft(build_base(kind, family), method_config(method, kind))
    perturb(model)
    model.eval()  # no dropout: both losses see the same network; gradients flow all the same
    inputs = batch(kind, seed=3)
    inputs["labels"] = inputs["labels"].clone()
    inputs["labels"][0, :7] = -100
    inputs["labels"][1, :8] = -100  # first scored label at position 7: 4 of 10 positions projected
    grads = []
    for loss in (lambda: model(**inputs).loss, lambda: labelled_loss(model, inputs)):
        model.zero_grad()
        value = loss()
        value.backward()
        grads.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (answer, answer_grads) = grads
    torch.testing.assert_close(answer, full, rtol=1e-5, atol=1e-6)
    assert answer_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(answer_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,kind,family", [c for c in CASES if c[0] in ZERO_INIT],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] in ZERO_INIT])
def test_no_op_at_initialisation(method, kind, family):
    inputs = batch(kind)
    want = logits(build_base(kind, family), inputs)
    model = pm.apply_peft(build_base(kind, family), method_config(method, kind))
    assert torch.equal(logits(model, inputs), want)


@pytest.mark.parametrize("method,kind,family", CASES, ids=IDS)
def test_save_load_round_trip(method, kind, family, tmp_path):
    inputs = batch(kind)
    model = pm.apply_peft(build_base(kind, family), method_config(method, kind))
    perturb(model)
    want = logits(model, inputs)
    assert not torch.equal(want, logits(build_base(kind, family), inputs))  # the adapter does something
    pm.save_peft(model, tmp_path)
    loaded = pm.load_peft(build_base(kind, family), tmp_path)
    assert type(loaded) is type(model)
    assert pm.count_trainable(loaded) == pm.count_trainable(model)
    assert torch.equal(logits(loaded, inputs), want)


MERGEABLE = [c for c in CASES if c[0] in ("lora", "dora", "rslora", "vera", "ia3", "loretta_rep")]


@pytest.mark.parametrize("method,kind,family", MERGEABLE, ids=[f"{m}-{k}-{f}" for m, k, f in MERGEABLE])
def test_merged_equals_unmerged(method, kind, family):
    inputs = batch(kind)
    model = pm.apply_peft(build_base(kind, family), method_config(method, kind))
    perturb(model)
    want = logits(model, inputs)
    pm.merge_peft(model)
    merged = logits(model, inputs)
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    pm.unmerge_peft(model)
    torch.testing.assert_close(logits(model, inputs), want, rtol=1e-4, atol=1e-5)


def test_merge_refused_where_it_does_not_exist():
    model = pm.apply_peft(build_base("gpt", "llama"), {"method": "adapter", "bottleneck": 4})
    with pytest.raises(ValueError, match="no merge"):
        pm.merge_peft(model)


def test_merged_model_is_not_saved(tmp_path):
    model = pm.apply_peft(build_base("gpt", "gpt2"), {"method": "loretta_rep", "r": 2, "tt_rank": 2})
    pm.merge_peft(model)
    with pytest.raises(ValueError, match="unmerge"):
        pm.save_peft(model, tmp_path)


@pytest.mark.parametrize("method", ["adapter", "loretta_adp", "loretta_rep", "lora"])
def test_deep_copies_are_independent(method):
    import copy

    inputs = batch("gpt")
    model = pm.apply_peft(build_base("gpt", "gpt2"), {"method": method})
    want = logits(model, inputs)
    twin = copy.deepcopy(model)
    perturb(twin)
    assert torch.equal(logits(model, inputs), want)
    assert not torch.equal(logits(twin, inputs), want)
    assert pm.count_trainable(twin) == pm.count_trainable(model)


@pytest.mark.parametrize("method,where", sorted(REFUSED), ids=[f"{m}-{w}" for m, w in sorted(REFUSED)])
def test_refusals_say_why(method, where):
    kind, family = {"retro": ("retro", "gpt2"), "retro_joint": ("retro_joint", "llama")}.get(where, ("gpt", where))
    with pytest.raises(ValueError, match=REFUSED[(method, where)]):
        pm.apply_peft(build_base(kind, family), method_config(method, kind))


@pytest.mark.parametrize("method", ["lora", "loretta_adp", "ptuning"])
def test_retro_survives_deepcopy_and_pickle(method, tmp_path):
    import copy

    inputs = batch("retro")
    model = pm.apply_peft(build_base("retro", "llama"), method_config(method, "retro"))
    perturb(model)
    with torch.no_grad():
        for p in model.retro_parameters() if hasattr(model, "retro_parameters") else model.model.retro_parameters():
            p.add_(0.05 * torch.randn_like(p))  # make retrieval visible in the logits
    want = logits(model, inputs)
    closed_book = logits(model, {k: v for k, v in inputs.items() if k != "neighbours"})
    assert not torch.equal(want, closed_book)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, inputs), want)  # retrieval still reaches the copy
    retro_of = (lambda m: m if hasattr(m, "set_gates") else m.model)
    retro_of(twin).set_gates(0.0)  # the copy's gates are its own: the original is untouched
    assert torch.equal(logits(model, inputs), want)
    assert not torch.equal(logits(twin, inputs), want)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(logits(loaded, inputs), want)


def test_norm_training_is_one_rule():
    # every method accepts train_norms and counts the norms of its selected layers as 'norm' (llama: 2 x 32 a layer)
    for method in ("lora", "ia3", "loretta_rep", "loretta_adp", "ptuning", "vera"):
        counts = pm.count_trainable(pm.apply_peft(build_base("gpt", "llama"),
                                                  {**method_config(method, "gpt"), "train_norms": True,
                                                   **({"layers": [0, 1]} if method != "ptuning" else {})}))
        assert counts["norm"] == (4 if method == "ptuning" else 2) * 64, method
    # the default is each paper's: Houlsby adapters train their layers' norms, LoRA does not
    assert pm.count_trainable(pm.apply_peft(build_base("gpt", "llama"), {"method": "adapter"}))["norm"] == 4 * 64
    assert pm.count_trainable(pm.apply_peft(build_base("gpt", "llama"), {"method": "lora"}))["norm"] == 0


def test_joint_retro_has_no_encoder_to_target():
    with pytest.raises(ValueError, match="no trained neighbour encoder"):
        pm.apply_peft(build_base("retro_joint", "llama"), {"method": "lora", "targets": ["retro_encoder"]})
