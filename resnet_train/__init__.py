"""resnet-train: a config-driven trainer for ResNets on CIFAR-10/100 and ImageNet."""

from resnet_train.models import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
