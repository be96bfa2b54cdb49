"""Deployment: encoders exported out of PyTorch (ONNX, int8) and runners for the exports.

Needs the ``deploy`` extra (``pip install -e '.[deploy]'``: onnx, onnxruntime, onnxscript).
"""
