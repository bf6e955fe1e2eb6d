"""A quantised frozen base (bitsandbytes NF4 / int8) runs on CUDA only: elsewhere it is refused with the documented
message, before any model is loaded; never silently ignored."""
from pathlib import Path

import pytest
import torch

import train
from backbones import QuantisationUnavailable, check_quantise, load_decoder

CONFIG = str(Path(__file__).parents[1] / "configs" / "finetune_gpt_lora.yaml")
NO_CUDA = "quantise=nf4: a quantised base (bitsandbytes) needs a CUDA GPU and this machine has none; remove " \
          "quantise (or set quantise=null) to train with the base in full precision"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


@cpu_only
def test_loader_refuses_before_reading_any_file(tmp_path):
    with pytest.raises(QuantisationUnavailable) as info:
        load_decoder(str(tmp_path / "no-such-model"), quantise="nf4")  # the refusal comes before the name's check
    assert str(info.value) == NO_CUDA
    check_quantise(None)  # no quantisation: nothing to refuse


@cpu_only
@pytest.mark.parametrize("model", ["gpt", "retro"])
def test_train_refuses_quantise_on_cpu_with_the_documented_message(capsys, monkeypatch, model):
    import backbones.resolve

    monkeypatch.setattr(backbones.resolve, "load_decoder", lambda *a, **k: pytest.fail("a model was loaded"))
    assert train.main([CONFIG, "quantise=nf4", f"model={model}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {NO_CUDA}"


def test_bad_quantise_values_name_the_field(capsys):
    assert train.main([CONFIG, "quantise=int4"]) == 2
    assert "quantise 'int4' is unknown; choose nf4" in capsys.readouterr().err
    assert train.main([CONFIG, "quantise=nf4", "peft.method=full"]) == 2
    assert "peft.method=full trains it; choose a PEFT method" in capsys.readouterr().err
