from resnet_train.cli import run

run()
