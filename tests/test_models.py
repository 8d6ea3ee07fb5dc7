import pytest
import torch

from bnff import models

# torchvision's published parameter counts (num_classes=1000).
COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_match_torchvision(name):
    m = models.MODELS[name]()
    assert sum(p.numel() for p in m.parameters()) == COUNTS[name]


def test_resnet50_state_dict_names_are_torchvision_names():
    sd = models.resnet50().state_dict()
    # a sample of torchvision's resnet50 keys, with their shapes
    expected = {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,), "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 2048), "fc.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 320  # torchvision resnet50 state_dict has 320 entries


def test_small_input_variant(gen):
    m = models.resnet18(num_classes=10, small_input=True)
    assert m.conv1.weight.shape == (64, 3, 3, 3)
    y = m(torch.randn(2, 3, 32, 32, generator=gen))
    assert y.shape == (2, 10)
    # a full-size state_dict loads into the full-size model, strict
    models.resnet18().load_state_dict(models.resnet18().state_dict(), strict=True)
