"""Scoring detections: COCO and VOC mean average precision, precision, recall, per-class AP."""
