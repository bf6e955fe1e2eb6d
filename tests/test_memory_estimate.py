"""The memory estimate from the meta device: its activation count equals the same count on real weights, its
parameter counts equal the PEFT accounting, and the command prints one row per model and method."""
import pytest
import torch

from conftest import TINY_VOCAB, tiny_config
from retrotune import memory


@pytest.fixture
def tiny_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("method", ["full", "lora", "loretta_rep"])
def test_meta_activations_equal_those_on_real_weights(method):
    from backbones import meta_decoder
    from peft_methods import apply_peft
    from transformers import AutoModelForCausalLM

    memory._register_attention()
    config = tiny_config("llama")
    on_meta = apply_peft(meta_decoder(config, dtype=torch.float32, attn_implementation=memory.ATTENTION),
                         {"method": method})
    real = apply_peft(AutoModelForCausalLM.from_config(config, attn_implementation=memory.ATTENTION),
                      {"method": method})
    measured = memory.saved_bytes_per_token(on_meta, 16)
    assert measured == memory.saved_bytes_per_token(real, 16) > 0
    assert all(p.device.type == "meta" for p in on_meta.parameters())  # nothing was allocated


def test_estimate_counts_and_table(tiny_folder, capsys):
    from peft_methods import apply_peft, count_trainable
    from transformers import AutoModelForCausalLM

    lora = memory.estimate(tiny_folder, {"method": "lora"}, dtype=torch.bfloat16, seq_len=16)
    counts = count_trainable(apply_peft(AutoModelForCausalLM.from_config(tiny_config("llama")), {"method": "lora"}))
    assert (lora.parameters, lora.trainable) == (counts["total"], counts["trainable"])
    assert lora.frozen_bytes == 2 * (counts["total"] - counts["trainable"])  # bf16
    assert lora.trainable_bytes == 16 * counts["trainable"]
    assert 0 < lora.checkpointed_bytes_per_token < lora.activation_bytes_per_token
    full = memory.estimate(tiny_folder, {"method": "full"}, dtype=torch.bfloat16, seq_len=16)
    assert full.frozen_bytes == 0 and full.trainable == full.parameters
    nf4 = memory.estimate(tiny_folder, {"method": "lora"}, dtype=torch.bfloat16, quantise="nf4", seq_len=16)
    assert nf4.frozen_bytes < lora.frozen_bytes

    assert memory.main(["--models", tiny_folder, "--methods", "lora", "full", "--seq-len", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tiny_folder} |")]
    assert [row.split(" | ")[1] for row in rows] == ["lora", "full"]
    assert memory.main(["--models", "no-such-shape"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown decoder 'no-such-shape'")
    assert TINY_VOCAB == tiny_config("llama").vocab_size
