"""Service layer: everything the UI and the CLI do goes through these classes, which filter every
query by owner on the server side."""

from app.services.errors import BadRequest, NotFound, NotReady, ServiceError

__all__ = ["BadRequest", "NotFound", "NotReady", "ServiceError"]
