"""Graph-to-graph tools: TensorRT lint, INT8 quantisation, FP16 conversion, TensorRT engine build."""
