from resnet_train.models import zoo  # noqa: F401  (registers the named networks)
from resnet_train.models.registry import create_model, list_models, register_model
from resnet_train.models.resnet import (
    BasicBlock,
    Bottleneck,
    PreActBlock,
    PreActBottleneck,
    ResNet,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "PreActBottleneck",
    "ResNet",
    "create_model",
    "list_models",
    "register_model",
]
