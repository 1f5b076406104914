"""Instance tokens: proof that a caller owns one generation of an entry.

A token reads `<generation>.<secret>`. The registry keeps only the sha256 of
the secret, so a database dump does not hand out tokens. The generation in
the clear lets the registry tell a stale token (an older incarnation of the
service) from a wrong one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .errors import PermissionDenied, Unauthenticated

_SECRET_BYTES = 24


@dataclass(frozen=True, slots=True)
class Token:
    generation: int
    secret_hash: bytes


def new_secret() -> tuple[str, bytes]:
    """A fresh secret and its hash."""
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return secret, _hash(secret)


def format_token(generation: int, secret: str) -> str:
    return f"{generation}.{secret}"


def parse_token(token: str) -> Token:
    if not token:
        raise Unauthenticated(
            "this call needs the instance token that Register returned"
        )
    generation, dot, secret = token.partition(".")
    # isdigit() alone lets through digits int() refuses, such as "²".
    if not dot or not (generation.isascii() and generation.isdigit()) or not secret:
        raise Unauthenticated(
            "the instance token is malformed; pass the token Register returned"
        )
    return Token(int(generation), _hash(secret))


def check_token(token: Token, generation: int, secret_hash: bytes) -> None:
    """PermissionDenied unless `token` is the one of the current generation."""
    if token.generation < generation:
        raise PermissionDenied(
            f"the token belongs to generation {token.generation}, but the instance "
            f"was registered again and is now at generation {generation}"
        )
    if token.generation != generation or not hmac.compare_digest(
        token.secret_hash, secret_hash
    ):
        raise PermissionDenied("the instance token does not match this instance")


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
