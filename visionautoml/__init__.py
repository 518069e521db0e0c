"""visionautoml: self-hosted AutoML for object detection.

The package is layered; imports point one way only:
``cli -> pipeline -> automl -> training -> models, data``; ``tracking`` and
``deploy`` are used by those layers and never import them.
"""

__version__ = "0.1.0"
