from resnet_train.start import run

run()
