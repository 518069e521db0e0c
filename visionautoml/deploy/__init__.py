"""Getting a trained model to its users: ONNX export with a parity check, batch prediction, serving.

``runtime`` loads a model for inference (its ONNX export when there is one, else PyTorch),
``export`` writes and checks the export, ``predict`` scores folders of images and ``serve``
answers HTTP requests in the cloud service's format. The MLflow pyfunc, a second way to serve,
lives with the tracking code in :mod:`visionautoml.tracking.pyfunc`.
"""
