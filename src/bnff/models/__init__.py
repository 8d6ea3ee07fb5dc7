"""torchvision-compatible architectures (same module names and parameter counts)."""

from bnff.models.densenet import DenseNet, densenet121, densenet169, densenet201
from bnff.models.inception import Inception3, InceptionOutputs, inception_v3
from bnff.models.mobilenet import MobileNetV2, mobilenet_v2
from bnff.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "densenet121": densenet121,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "inception_v3": inception_v3,
    "mobilenet_v2": mobilenet_v2,
}

__all__ = ["MODELS", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "DenseNet", "densenet121",
           "densenet169", "densenet201", "Inception3", "InceptionOutputs", "inception_v3", "MobileNetV2",
           "mobilenet_v2"]
