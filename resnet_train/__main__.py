from resnet_train.cli import main

main()
