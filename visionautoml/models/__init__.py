"""Detectors: the zoo of architectures, pretrained weights, the saved-model format and the predictor."""
