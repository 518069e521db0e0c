"""The scoring service's wire format: response models, the request body schema and the error codes.

Kept apart from the app so the OpenAPI document and the cloud service's format have one home.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from visionautoml.config import Thresholds, Tiling


class Box(BaseModel):
    topX: float
    topY: float
    bottomX: float
    bottomY: float


class Detection(BaseModel):
    box: Box
    label: str
    score: float


class ImageResult(BaseModel):
    filename: str
    boxes: list[Detection]


class ErrorMessage(BaseModel):
    detail: str


class Metadata(BaseModel):
    model_name: str
    registered_model: str | None
    version: str | None
    source: str
    backend: str
    precision: str
    labels: list[str]
    thresholds: Thresholds
    tiling: Tiling
    """What inference runs: the model's tile grid (or the one ``serve`` was given), none without tiling."""


SCORE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "one image"},
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "several images",
                    },
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["input_data"],
                "properties": {
                    "input_data": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "columns": {"type": "array", "items": {"type": "string"}},
                            "data": {
                                "type": "array",
                                "items": {"type": "string", "format": "byte"},
                                "description": "base64-encoded image files",
                            },
                        },
                    }
                },
            },
            "example": {"input_data": {"columns": ["image"], "data": ["<base64 of a JPEG or PNG file>"]}},
        },
    },
}

ERRORS = {
    400: "a malformed multipart body or Content-Length",
    401: "missing or wrong API key",
    413: "body, image count, or pixels of an image or of the request over the limit",
    415: "not an image, or not multipart/form-data or JSON",
    422: "undecodable image, bad base64 or a malformed request",
    503: "the server is busy; retry later",
    504: "inference took longer than the request timeout",
}
