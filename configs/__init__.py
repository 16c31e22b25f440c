"""The YAML configs, installed as the package ``resnet_train.configs`` (see pyproject.toml)."""
