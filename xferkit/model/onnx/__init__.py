"""A model as one ONNX graph (uint8 images in, calibrated probabilities out) and predictions from it.

``graph`` builds and exports the graph, ``metadata`` is what the file records about the model,
``runtime`` predicts from the file with onnxruntime. ``onnx`` and ``onnxruntime`` are optional:
``pip install 'xferkit[export]'``.
"""
