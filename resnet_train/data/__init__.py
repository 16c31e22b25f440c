from resnet_train.data.loaders import Loaders, build_loaders, check_data

__all__ = ["Loaders", "build_loaders", "check_data"]
