"""One small exception hierarchy. Each error carries the HTTP status and a stable code string;
the API turns it into {"error": {"code", "message"}} and the CLI into a message and exit 1."""

from __future__ import annotations


class ImagerecError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidInput(ImagerecError):
    """The client sent something malformed: a bad parameter, bad base64, an undecodable image."""

    status = 400
    code = "invalid_input"


class InvalidImage(InvalidInput):
    code = "invalid_image"


class UnsupportedMediaType(ImagerecError):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ImagerecError):
    status = 413
    code = "payload_too_large"


class NotFound(ImagerecError):
    status = 404
    code = "not_found"


class NotReady(ImagerecError):
    status = 503
    code = "not_ready"


class DatasetError(ImagerecError):
    """A dataset cannot be read or is unusable for training (missing, empty, one class only)."""

    status = 400
    code = "invalid_dataset"


class BundleError(ImagerecError):
    """A model bundle is missing, incomplete or tampered with."""

    status = 500
    code = "invalid_bundle"


class WeightsUnavailable(ImagerecError):
    """Pretrained weights could not be had: offline, refused, or not the published file."""

    status = 503
    code = "weights_unavailable"
