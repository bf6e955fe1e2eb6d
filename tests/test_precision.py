"""`train.precision`: what each choice resolves to on this machine, what is refused, and the context evaluation
computes in."""
import pytest
import torch

import retrotune.precision as precision

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rules")


def test_auto_and_fp32_compute_in_float32_on_a_cpu():
    assert precision.resolve("auto") == precision.resolve("fp32") == "fp32"
    with precision.autocast("auto", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_fp16_is_refused_on_a_cpu():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        precision.resolve("fp16")


def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bf16 .*use fp32"):
        precision.resolve("bf16")


def test_bf16_on_a_capable_cpu_runs_matrix_products_in_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve("bf16") == "bf16"
    weight = torch.nn.Linear(4, 4)
    with precision.autocast("bf16", None):
        assert weight(torch.ones(1, 4)).dtype == torch.bfloat16
    assert weight.weight.dtype == torch.float32  # the weights themselves stay float32
