"""torchvision- and timm-compatible architectures (same module names and parameter counts)."""

from bnff.names import MODEL_NAMES
from bnff.models.cspdarknet import CspDarknet, cspdarknet53
from bnff.models.densenet import DenseNet, densenet121, densenet169, densenet201
from bnff.models.inception import Inception3, InceptionOutputs, inception_v3
from bnff.models.efficientnet import EfficientNet, efficientnet_b0
from bnff.models.mobilenet import MobileNetV2, mobilenet_v2
from bnff.models.mobilenetv3 import MobileNetV3, mobilenet_v3_large
from bnff.models.regnet import RegNet, regnet_y_1_6gf
from bnff.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101

MODELS = {name: globals()[name] for name in MODEL_NAMES}

__all__ = ["MODELS", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "DenseNet", "densenet121",
           "densenet169", "densenet201", "Inception3", "InceptionOutputs", "inception_v3", "MobileNetV2",
           "mobilenet_v2", "MobileNetV3", "mobilenet_v3_large", "EfficientNet", "efficientnet_b0", "RegNet",
           "regnet_y_1_6gf", "CspDarknet", "cspdarknet53"]
