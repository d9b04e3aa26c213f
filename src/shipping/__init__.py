"""What leaves the project: the ONNX file and its int8 twin (`onnx_export`, torch), the ONNX
model run by onnxruntime without torch (`onnx_runtime`), and the MLflow model that takes image
bytes for `mlflow models serve` (`serving`, torch-free)."""
