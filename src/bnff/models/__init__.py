"""torchvision-compatible architectures (same module names and parameter counts)."""

from bnff.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}

__all__ = ["MODELS", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101"]
