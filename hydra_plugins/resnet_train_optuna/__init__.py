"""resnet-train's Optuna sweeper for Hydra (see resumable_sweeper.py). Hydra finds sweepers in
the hydra_plugins namespace package only, hence this small package beside resnet_train."""
