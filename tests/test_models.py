import pytest
import torch

from bnff import models

# torchvision's published parameter counts (num_classes=1000); timm's for cspdarknet53.
COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
          "densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928,
          "inception_v3": 27_161_264, "mobilenet_v2": 3_504_872, "efficientnet_b0": 5_288_548,
          "mobilenet_v3_large": 5_483_032, "regnet_y_1_6gf": 11_202_430,
          "cspdarknet53": 27_642_184}


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


def test_other_families_state_dict_names_are_torchvision_names():
    samples = {
        "densenet121": {"features.conv0.weight": (64, 3, 7, 7), "features.denseblock1.denselayer1.norm1.weight": (64,),
                        "features.denseblock3.denselayer24.conv2.weight": (32, 128, 3, 3),
                        "features.transition2.conv.weight": (256, 512, 1, 1), "features.norm5.running_var": (1024,),
                        "classifier.weight": (1000, 1024)},
        "inception_v3": {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_mean": (32,),
                         "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7), "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
                         "AuxLogits.fc.weight": (1000, 768), "Mixed_7c.branch_pool.bn.bias": (192,), "fc.weight": (1000, 2048)},
        "mobilenet_v2": {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                         "features.2.conv.1.1.running_var": (96,), "features.17.conv.2.weight": (320, 960, 1, 1),
                         "features.18.1.weight": (1280,), "classifier.1.weight": (1000, 1280)},
        "efficientnet_b0": {"features.0.0.weight": (32, 3, 3, 3), "features.1.0.block.0.0.weight": (32, 1, 3, 3),
                            "features.1.0.block.1.fc1.weight": (8, 32, 1, 1), "features.1.0.block.1.fc2.bias": (32,),
                            "features.2.0.block.0.1.running_var": (96,), "features.6.3.block.3.0.weight": (192, 1152, 1, 1),
                            "features.8.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280)},
        "mobilenet_v3_large": {"features.0.0.weight": (16, 3, 3, 3), "features.1.block.0.0.weight": (16, 1, 3, 3),
                               "features.4.block.2.fc1.weight": (24, 72, 1, 1), "features.4.block.2.fc2.weight": (72, 24, 1, 1),
                               "features.15.block.3.1.running_mean": (160,), "features.16.0.weight": (960, 160, 1, 1),
                               "classifier.0.weight": (1280, 960), "classifier.3.weight": (1000, 1280)},
        "regnet_y_1_6gf": {"stem.0.weight": (32, 3, 3, 3), "trunk_output.block1.block1-0.proj.0.weight": (48, 32, 1, 1),
                           "trunk_output.block1.block1-0.f.b.0.weight": (48, 24, 3, 3),
                           "trunk_output.block1.block1-0.f.se.fc1.weight": (8, 48, 1, 1),
                           "trunk_output.block3.block3-16.f.c.1.running_var": (336,),
                           "trunk_output.block4.block4-1.f.a.0.weight": (888, 888, 1, 1), "fc.weight": (1000, 888)},
        # timm's names (timm/models/cspnet.py: ConvNormAct's conv and bn, a BatchNormAct2d)
        "cspdarknet53": {"stem.conv1.conv.weight": (32, 3, 3, 3), "stages.0.conv_down.conv.weight": (64, 32, 3, 3),
                         "stages.0.conv_exp.conv.weight": (128, 64, 1, 1),
                         "stages.0.blocks.0.conv1.conv.weight": (32, 64, 1, 1),
                         "stages.0.blocks.0.conv2.conv.weight": (64, 32, 3, 3),
                         "stages.0.conv_transition_b.conv.weight": (64, 64, 1, 1),
                         "stages.0.conv_transition.conv.weight": (64, 128, 1, 1),
                         "stages.2.blocks.7.conv2.bn.running_var": (128,), "stages.4.conv_transition.bn.weight": (1024,),
                         "head.fc.weight": (1000, 1024)},
    }
    for name, expected in samples.items():
        sd = models.MODELS[name]().state_dict()
        for key, shape in expected.items():
            assert tuple(sd[key].shape) == shape, (name, key)


@pytest.mark.parametrize("name, size", [("densenet121", 32), ("inception_v3", 32), ("mobilenet_v2", 32),
                                        ("efficientnet_b0", 32), ("mobilenet_v3_large", 32), ("regnet_y_1_6gf", 32),
                                        ("cspdarknet53", 32)])
def test_small_input_variants_of_other_families(name, size, gen):
    m = models.MODELS[name](num_classes=10, small_input=True).eval()
    assert m(torch.randn(2, 3, size, size, generator=gen)).shape == (2, 10)
    full = models.MODELS[name](num_classes=10)
    small_keys = set(models.MODELS[name](num_classes=10, small_input=True).state_dict())
    assert small_keys == set(full.state_dict())  # same names; only the stem's shapes may differ


def test_inception_v3_full_size_training_outputs(gen):
    m = models.inception_v3(num_classes=10)
    out = m(torch.randn(2, 3, 299, 299, generator=gen))
    assert isinstance(out, models.InceptionOutputs) and out.logits.shape == out.aux_logits.shape == (2, 10)
    assert all(b.eps == 1e-3 for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
