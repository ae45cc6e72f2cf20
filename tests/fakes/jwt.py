"""Unsigned JWTs for the fakes: readable by ``actors.accounts.jwt_claims``, trusted by nobody.

The proxy never verifies token signatures (the tokens come from the upstream over TLS),
so the fake mints ``header.payload.signature`` with a placeholder signature.
"""

from __future__ import annotations

import base64
import json
from typing import Any

_HEADER = {"alg": "none", "typ": "JWT", "kid": "fake"}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def mint_jwt(claims: dict[str, Any], *, signature: str = "fake") -> str:
    """Encode ``claims`` as an unsigned JWT (``signature`` is an opaque placeholder)."""
    header = _b64url(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{header}.{payload}.{signature}"


def read_jwt(token: str) -> dict[str, Any]:
    """Decode a JWT's payload; raise ValueError when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT: expected three dot-separated parts")
    padded = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not a JSON object")
    return claims
