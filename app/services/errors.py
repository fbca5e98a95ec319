"""Service-layer errors. Messages are one line and safe to show to the user who caused them."""


class ServiceError(Exception):
    """Base class: a request that cannot be served as asked."""


class NotFound(ServiceError):
    """The object does not exist *for this owner*. Another owner's object looks exactly like a
    missing one, so ids of other users' documents or conversations reveal nothing."""


class NotReady(ServiceError):
    """A selected document is still being ingested, or failed; the message says which and why."""


class BadRequest(ServiceError):
    """Invalid input (empty question, unknown engine, file too large...)."""
