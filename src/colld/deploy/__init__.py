"""Deployment: encoders exported out of PyTorch (ONNX, int8) and runners for the exports, and
colld encoders as s3prl upstreams (``colld.deploy.s3prl``, SUPERB).

The ONNX modules need the ``deploy`` extra (``pip install -e '.[deploy]'``: onnx, onnxruntime,
onnxscript); ``colld.deploy.s3prl`` needs nothing beyond colld.
"""
