"""The QA contract shared by RETRO and the GPT baseline: layout, prompt budget, loss on answers, generation."""
import numpy as np
import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm, open_retro
from retro import GPTQA, RetroConfig, RetroQA, gpt_prompt, qa_layout, retrofit

M = 4
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'-\n[]"


def char_tokenizer(chat_template: str | None = None):
    """A character-level tokenizer that fits the tiny models' 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        hf.chat_template = chat_template
    return hf


def examples(tok, with_answers=True, k=2, r=2 * M):
    rng = np.random.default_rng(0)
    qs = ["who wrote it?", "where is the tower of pisa?", "why?"]
    answers = ["ann", "in pisa, italy", "because"]
    out = []
    for q, a in zip(qs, answers):
        nb = rng.integers(3, TINY_VOCAB, size=(k, r))
        nb[-1, r // 2:] = -1
        ex = {"question": q, "neighbour_tokens": nb, "neighbour_texts": [f"passage about {q}", "more text " * 5]}
        if with_answers:
            ex["answer"] = a
        out.append(ex)
    return out


def test_layout_aligns_prompts_to_chunks_and_labels_only_answers():
    prompts, answers = [[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[11, 12], [13]]
    nbs = [np.full((2, 8), 20), np.full((1, 8), 21)]
    b = qa_layout(prompts, answers, M, pad_token_id=0, neighbours=nbs, num_neighbours=2, neighbour_length=8)
    P = int(b["prompt_length"])
    assert P == 8 and P % M == 0
    assert b["input_ids"][0, P - 3:P].tolist() == [5, 6, 7] and b["attention_mask"][0, :P - 3].sum() == 0
    assert b["input_ids"][:, P].tolist() == [11, 13]  # every answer starts a new chunk
    assert b["labels"][0].tolist() == [-100] * P + [11, 12]
    assert b["labels"][1].tolist() == [-100] * P + [13, -100]
    assert b["position_ids"][0, P - 3].item() == 0
    nb = b["neighbours"]
    assert nb.shape == (2, 3, 2, 8)
    assert (nb[0, 0] == -1).all()  # pure padding chunk gets no neighbours
    assert (nb[0, 1:] == 20).all()
    assert (nb[1, :, 0] == 21).all() and (nb[1, :, 1] == -1).all()  # K padded with missing neighbours
    only = qa_layout(prompts, None, M, 0, neighbours=nbs)
    assert "labels" not in only and only["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="no tokens"):
        qa_layout([[]], None, M, 0)


def test_gpt_prompt_budget_keeps_the_question_and_shares_equally():
    tok = char_tokenizer()
    q = "what is the capital of france?"
    short, long = "paris is in france.", "x" * 400
    ids = gpt_prompt(q, [long, short, long], tok, budget=200)
    text = tok.decode(ids)
    assert len(ids) <= 200 and q in text and short in text
    no_room = gpt_prompt(q, [long], tok, budget=10)  # the question is never truncated
    assert q in tok.decode(no_room) and "x" not in tok.decode(no_room)
    # the two long passages get equal shares of what the short one leaves
    lines = [ln for ln in text.split("\n") if ln.startswith("[")]
    assert abs(lines[0].count("x") - lines[2].count("x")) <= 1


@pytest.mark.parametrize("template", [None, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"])
def test_retro_and_gpt_share_one_contract(tiny_family, template):
    tok = char_tokenizer(template)
    retro = retrofit(build_tiny_lm(tiny_family), RetroConfig(chunk_size=M, num_neighbours=2))
    open_retro(retro, 0.5)
    gpt = build_tiny_lm(tiny_family)
    for qa in (RetroQA(retro, tok), GPTQA(gpt, tok, num_neighbours=2, budget=120)):
        batch = qa.encode_batch(examples(tok))
        assert batch["input_ids"].shape == batch["labels"].shape
        answer_tokens = (batch["labels"] != -100).sum().item()
        lead = 1 if template is None else 0  # " answer" after "Answer:", bare answer after a chat template
        assert answer_tokens == sum(lead + len(a) + 1 for a in ("ann", "in pisa, italy", "because"))  # + eos
        loss = qa.loss(batch)
        assert torch.isfinite(loss) and loss.requires_grad
        loss.backward()
        texts = qa.generate(batch, max_new_tokens=6)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
        # generating from an answered batch uses its prompt part only: same as a prompt-only batch
        assert qa.generate(qa.encode_batch(examples(tok, with_answers=False)), max_new_tokens=6) == texts
    if template is None:
        assert "answer:" in tok.decode(RetroQA(retro, tok).encode_batch(examples(tok))["input_ids"][0])
    assert retro.training  # generate restores the training mode it found
    with pytest.raises(ValueError, match="no `answer`"):
        RetroQA(retro, tok).encode_batch(examples(tok)[:1] + examples(tok, with_answers=False)[:1])


def test_retro_qa_re_retrieves_through_a_retriever_object():
    tok = char_tokenizer()
    retro = retrofit(build_tiny_lm("llama"), RetroConfig(chunk_size=M, num_neighbours=2))
    open_retro(retro)

    class Retriever:
        def __init__(self):
            self.calls = []

        def neighbour_tokens(self, texts, k, exclude_doc_ids=None):
            self.calls.append((list(texts), k))
            return np.full((len(texts), k, 2 * M), 7, dtype=np.int64)

    r = Retriever()
    qa = RetroQA(retro, tok, retrieve=r)
    qa.generate(qa.encode_batch(examples(tok, with_answers=False)), max_new_tokens=2 * M + 1)
    assert len(r.calls) == 2 and all(k == 2 and len(texts) == 3 for texts, k in r.calls)


def test_neighbours_cut_by_the_prompt_budget_are_counted_and_warned_once():
    from retrotune.evaluation import evaluate_qa

    tok = char_tokenizer()
    model = build_tiny_lm("llama")
    records = [{"id": str(i), "question": f"question {i}?", "answers": ["a"], "neighbour_texts": [text]}
               for i, text in enumerate(["short passage.", "y" * 300, "z" * 300])]
    tight = GPTQA(model, tok, num_neighbours=1, budget=80)
    with pytest.warns(UserWarning, match=r"2 of 3 questions lost neighbour text .*prompt_budget=80") as seen:
        scores, _ = evaluate_qa(tight, records, batch_size=3, max_new_tokens=1)
    assert scores["neighbours_cut"] == 2 and len(seen) == 1  # one warning for the whole evaluation
    import warnings

    roomy = GPTQA(model, tok, num_neighbours=1, budget=1024)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scores, _ = evaluate_qa(roomy, records, batch_size=3, max_new_tokens=1)
    assert scores["neighbours_cut"] == 0 and not [w for w in seen if "lost neighbour text" in str(w.message)]


def test_a_prompt_budget_below_the_longest_question_is_refused_at_config_load():
    from retrotune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"prompt_budget \(32\) must be at least data.max_question_tokens \(64\)"):
        load_config(None, base={"model": "gpt", "prompt_budget": 32})
