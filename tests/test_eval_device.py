"""prepare_for_inference, strict mode: eval mode, device, channels_last_3d weights, same results."""

from __future__ import annotations

import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.engine.inference import prepare_for_inference


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    model = nl.build_model("c2d_nonlocal_8x8_IN_pretrain_400k", split="test")
    x = torch.randn(2, 3, 8, 256, 256)
    with torch.inference_mode():
        reference = model(x)
    prepared = prepare_for_inference(model, torch.device("cpu"))
    assert prepared is model and not model.training
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-7)
    prepare_for_inference(model, torch.device("cpu"), channels_last=False)
    assert model.conv1.weight.is_contiguous()


def test_not_the_train_split():
    model = nl.build_model("c2d_baseline_8x8_IN_pretrain_400k", split="train")
    with pytest.raises(ValueError, match="val- or test-split model, got split 'train'"):
        prepare_for_inference(model, torch.device("cpu"))
