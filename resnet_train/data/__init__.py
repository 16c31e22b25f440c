from resnet_train.data.loaders import Loaders, build_loaders

__all__ = ["Loaders", "build_loaders"]
