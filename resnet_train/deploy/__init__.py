"""After training: evaluate a trained model, fold its batch norms, export it (ONNX, torch.export)
and quantize it to int8. Imports models and data, never the training engine."""
