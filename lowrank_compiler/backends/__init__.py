"""Lowerings of a transformed GraphModule: torch.compile and ONNX Runtime."""
