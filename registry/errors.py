"""The registry's exceptions.

Everything the registry raises on purpose derives from RegistryError. Each
subclass stands for one kind of failure a caller can act on; the gRPC edge
maps each to one status code, in one place (registry._grpc), so that no
handler chooses status codes itself.

    RegistryError
    ├── InvalidArgument      the request is malformed; nothing was stored
    ├── NotFound             no such name or instance
    ├── AlreadyExists        a port named by the caller is held by another instance
    ├── FailedPrecondition   the registry is not set up for the request (no
    │                        broker configured), or the broker holds topology
    │                        that contradicts it (an exchange of another type)
    ├── Unauthenticated      no instance token where one is required
    ├── PermissionDenied     a token of another generation, or a wrong token
    ├── OutOfRange           a watch from a revision older than the log holds
    ├── ResourceExhausted    a watcher fell behind; a request too large
    ├── DeadlineExceeded     the caller's deadline passed while waiting
    └── Unavailable          Postgres (or a needed dependency) is unreachable,
                             or a name has no active instance
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""


class InvalidArgument(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class FailedPrecondition(RegistryError):
    pass


class Unauthenticated(RegistryError):
    pass


class PermissionDenied(RegistryError):
    pass


class OutOfRange(RegistryError):
    pass


class ResourceExhausted(RegistryError):
    pass


class DeadlineExceeded(RegistryError):
    pass


class Unavailable(RegistryError):
    pass
