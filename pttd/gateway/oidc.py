"""OpenID Connect logins: an ``id_token`` verified against its provider's published keys.

A provider is configured by its issuer, its client id (the audience), and where its keys
are (a JWKS URL or a file). The keys are cached; a token naming a key id that is not in
the cache makes one fresh fetch (providers rotate keys), at most once per
``jwks_min_refresh`` seconds, so that forged key ids cannot make us hammer the provider.

What is checked, in this order (the first failure is the reason, logged and answered):
the token's shape; its issuer is a configured provider; its algorithm is an asymmetric
one the provider allows (never ``none``, never HMAC: a provider's public key used as an
HMAC secret is the classic algorithm confusion); its key id is one of the provider's
keys, of the type the algorithm needs; the signature; ``exp``, ``nbf`` and ``iat`` with a
small clock-skew allowance; the audience; a subject; and, when the provider lists allowed
email domains, a verified email in one of them.

PyJWT does the JOSE work (parsing, signature checks, claims); this module picks the key
and decides what to accept.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import jwt
import trio

from ..config import OidcProvider
from ..errors import Unauthorized

log = logging.getLogger("pttd.oidc")

# asymmetric algorithms only: what each kind of key may sign with
ALGORITHMS = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512"),
    "OKP": ("EdDSA",),
}
MAX_JWKS_BYTES = 1 << 20
MAX_TOKEN_BYTES = 16 << 10
FETCH_TIMEOUT = 10.0


class Refused(Unauthorized):
    """An id_token not accepted; the message is the reason."""


class Keys:
    """A provider's signing keys, fetched and cached."""

    def __init__(self, provider: OidcProvider):
        self.provider = provider
        self.by_kid: dict[str, jwt.PyJWK] = {}
        self.unnamed: list[jwt.PyJWK] = []
        self.fetched = float("-inf")
        self._lock = trio.Lock()

    async def get(self, kid: str | None) -> jwt.PyJWK:
        p = self.provider
        stale = time.monotonic() - self.fetched > p.jwks_max_age
        if stale or self._find(kid) is None:
            async with self._lock:  # one fetch for many logins arriving together
                again = time.monotonic() - self.fetched
                if (stale and again > p.jwks_max_age) or (self._find(kid) is None and again >= p.jwks_min_refresh):
                    await self._fetch()
        key = self._find(kid)
        if key is None:
            raise Refused(f"the token's key id {kid!r} is not one of {p.name}'s keys (refreshed: still unknown)")
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self.by_kid.get(kid)
        keys = list(self.by_kid.values()) + self.unnamed
        return keys[0] if len(keys) == 1 else None  # no kid: only a provider with a single key

    async def _fetch(self) -> None:
        p = self.provider
        self.fetched = time.monotonic()  # a failed fetch waits its turn too
        try:
            raw = await trio.to_thread.run_sync(_read_jwks, p.jwks)
            doc = json.loads(raw)
            keys = doc.get("keys") if isinstance(doc, dict) else None
            if not isinstance(keys, list):
                raise ValueError('not a JWK Set ({"keys": [...]})')
        except (OSError, ValueError) as exc:
            log.warning(
                "OIDC %s: cannot read keys from %s: %s (keeping %d cached)", p.name, p.jwks, exc, len(self.by_kid)
            )
            return
        by_kid: dict[str, jwt.PyJWK] = {}
        unnamed: list[jwt.PyJWK] = []
        for jwk in keys:
            if not isinstance(jwk, dict) or jwk.get("kty") not in ALGORITHMS or jwk.get("use", "sig") != "sig":
                continue  # symmetric ("oct") keys are never taken: no HMAC from a JWKS
            try:
                key = jwt.PyJWK(jwk)
            except jwt.PyJWTError:
                continue
            if isinstance(jwk.get("kid"), str):
                by_kid[jwk["kid"]] = key
            else:
                unnamed.append(key)
        self.by_kid, self.unnamed = by_kid, unnamed
        log.info("OIDC %s: %d signing keys from %s", p.name, len(by_kid) + len(unnamed), p.jwks)


def _read_jwks(where: str) -> bytes:
    if where.startswith(("https://", "http://")):
        req = urllib.request.Request(where, headers={"Accept": "application/json", "User-Agent": "pttd"})
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as r:  # noqa: S310 (the operator's URL)
            raw = r.read(MAX_JWKS_BYTES + 1)
    else:
        with open(where, "rb") as f:
            raw = f.read(MAX_JWKS_BYTES + 1)
    if len(raw) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return raw


class Verifier:
    """The configured providers; ``verify`` answers a token's provider and claims."""

    def __init__(self, providers: list[OidcProvider]):
        self.providers = providers
        self.keys = {p.name: Keys(p) for p in providers}

    def public(self) -> list[dict]:
        """What the web client shows: a button per provider."""
        return [
            {
                "name": p.name,
                "issuer": p.issuer,
                "client_id": p.client_id,
                "authorization_endpoint": p.authorization_endpoint or None,
            }
            for p in self.providers
        ]

    async def verify(self, token) -> tuple[OidcProvider, dict]:
        if not self.providers:
            raise Refused("OpenID Connect login is not configured on this gateway")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise Refused("id_token must be a JWT (a string of at most 16 KiB)")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Refused(f"id_token is not a JWT: {exc}") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise Refused("id_token has no issuer (iss) string")
        provider = next((p for p in self.providers if iss in p.issuers), None)
        if provider is None:
            raise Refused(f"issuer {str(iss)[:100]!r} is not a provider of this gateway")
        alg = header.get("alg")
        if alg not in provider.algorithms:
            raise Refused(f"algorithm {str(alg)[:20]!r} is not accepted for {provider.name}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Refused("the token's kid is not a string")
        key = await self.keys[provider.name].get(kid)
        if alg not in ALGORITHMS[key.key_type]:
            raise Refused(f"algorithm {alg} does not go with key {kid!r} ({key.key_type})")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=provider.client_id,
                issuer=list(provider.issuers),
                leeway=provider.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("id_token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Refused("id_token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Refused(f"id_token is not for this gateway (audience is not {provider.client_id})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Refused(f"id_token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Refused("id_token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Refused(f"id_token refused: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= 255:
            raise Refused("id_token has no subject (sub)")
        # OpenID Connect Core 3.1.3.7: a token for several audiences names the party it
        # was issued to (azp), which must be this gateway's client id
        azp, aud = claims.get("azp"), claims.get("aud")
        if azp is not None and azp != provider.client_id:
            raise Refused(f"id_token was issued to another client (azp is not {provider.client_id})")
        if isinstance(aud, list) and len(aud) > 1 and azp is None:
            raise Refused("id_token is for several audiences and names no authorized party (azp)")
        if provider.allowed_domains:
            email = claims.get("email")
            if not isinstance(email, str) or "@" not in email:
                raise Refused("id_token has no email, and this gateway allows only some email domains")
            # verified only if the provider says so: some send "false" as a string, some
            # (Azure AD) send no claim for addresses their users can edit
            if claims.get("email_verified") not in (True, "true"):
                raise Refused(f"the email {email} is not verified by {provider.name}")
            domain = email.rsplit("@", 1)[1].lower()
            if domain not in {d.lower() for d in provider.allowed_domains}:
                raise Refused(f"email domain {domain} is not allowed on this gateway")
        return provider, claims
