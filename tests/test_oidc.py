"""OpenID Connect logins against locally generated RSA and EC keys standing in for a
provider: its keys as a JWKS file, or served over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pttd.config import ConfigError, OidcProvider
from tests.gwutil import gateway, result

ISSUER = "https://id.example.test"
CLIENT = "pttd-test-client"


class Signer:
    """A provider's signing key: makes tokens and its public JWK."""

    def __init__(self, kind: str, kid: str):
        self.kid = kid
        if kind == "RSA":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"

    def jwk(self) -> dict:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        d = json.loads(algo.to_jwk(self.key.public_key()))
        d.update(kid=self.kid, use="sig", alg=self.alg)
        return d

    def token(self, kid: str | None = "same", **overrides) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": CLIENT,
            "sub": "user-1",
            "iat": now,
            "exp": now + 600,
            "name": "Ada Lovelace",
            "email": "ada@example.org",
            "email_verified": True,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        headers = {"kid": self.kid if kid == "same" else kid} if kid is not None else {}
        return jwt.encode(claims, self.key, algorithm=self.alg, headers=headers)

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict, alg: str = "none") -> str:
    return f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}."


def hs256_with_public_key(signer: Signer, claims: dict) -> str:
    """The algorithm-confusion attack: HS256 keyed with the provider's public key."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(signer.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def provider(jwks: str, **kw) -> OidcProvider:
    p = OidcProvider(name="Test ID", issuer=ISSUER, client_id=CLIENT, jwks=jwks, jwks_min_refresh=0.0)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@contextmanager
def jwks_server(doc: dict):
    """Serves ``doc`` (changed in place by the test) as a JWKS on 127.0.0.1; counts fetches."""
    fetches = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(doc).encode()
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/certs", fetches
    finally:
        server.shutdown()
        server.server_close()


async def login(g, token, status=200):
    return result(await g.web.post("/login", json={"data": {"id_token": token}}), status)


async def user_count(g) -> int:
    return len(await g.gateway.list_users())


async def test_oidc_logins_with_keys_from_a_jwks_file(tmp_path, caplog):
    caplog.set_level(logging.INFO, "pttd")
    rsa_key, ec_key = Signer("RSA", "rsa-1"), Signer("EC", "ec-1")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_key.jwk(), ec_key.jwk()]}))
    p = provider(str(jwks), allowed_domains=["example.org"], issuer_aliases=["id.example.test"])
    async with gateway(tmp_path, oidc=[p]) as g:
        info = result(await g.web.get("/gateway.json"))
        assert info["login"]["oidc"] == [
            {"name": "Test ID", "issuer": ISSUER, "client_id": CLIENT, "authorization_endpoint": None}
        ]
        first = await login(g, rsa_key.token())
        assert set(first) == {"key", "token", "refresh_token", "expires_in"}
        headers = {"Authorization": f"Bearer {first['token']}"}
        assert result(await g.web.get("/profile", headers=headers))["name"] == "Ada Lovelace"
        # the same subject again, by the other key, by an alias of the issuer, and in the
        # earlier client's nested shape: the same repository
        assert (await login(g, ec_key.token()))["key"] == first["key"]
        assert (await login(g, rsa_key.token(iss="id.example.test")))["key"] == first["key"]
        nested = await g.web.post("/login", json={"data": {"id_token": {"id_token": rsa_key.token()}}})
        assert result(nested)["key"] == first["key"]
        # several audiences with this gateway as the authorized party
        assert (await login(g, rsa_key.token(aud=[CLIENT, "x"], azp=CLIENT)))["key"] == first["key"]
        # within the clock-skew allowance
        now = int(time.time())
        assert (await login(g, rsa_key.token(exp=now - 30)))["key"] == first["key"]
        # another subject: another repository, named from the email when the token has no name
        other = await login(g, ec_key.token(sub="user-2", name=None, email="bob@example.org"))
        assert other["key"] != first["key"]
        h2 = {"Authorization": f"Bearer {other['token']}"}
        assert result(await g.web.get("/profile", headers=h2))["name"] == "bob"
        users = await user_count(g)
        assert users == 2

        stranger = Signer("RSA", "rsa-1")  # the provider's kid, another key
        good = dict(iss=ISSUER, aud=CLIENT, sub="user-9", iat=now, exp=now + 600, email="eve@example.org")
        refusals = {
            "audience": rsa_key.token(aud="someone-else"),
            "issuer": rsa_key.token(iss="https://evil.example"),
            "signature": stranger.token(),
            "expired": rsa_key.token(exp=now - 120),
            "not valid yet": rsa_key.token(nbf=now + 300),
            "algorithm 'none'": unsigned(good),
            "algorithm 'HS256'": hs256_with_public_key(rsa_key, good),
            "key id 'rsa-9'": rsa_key.token(kid="rsa-9"),
            "domain evil.org": rsa_key.token(sub="user-9", email="eve@evil.org"),
            "not verified": rsa_key.token(sub="user-9", email_verified=False),
            # some providers send the string, some (Azure AD) no claim at all
            "not verified ": rsa_key.token(sub="user-9", email_verified="false"),
            " not verified": rsa_key.token(sub="user-9", email_verified=None),
            "has no sub claim": rsa_key.token(sub=None),
            "has no exp claim": rsa_key.token(exp=None),
            "not a JWT": "not.a.jwt",
            "issued to another client": rsa_key.token(azp="someone-else"),
            "names no authorized party": rsa_key.token(aud=[CLIENT, "another-app"]),
            "no issuer (iss) string": jwt.PyJWS().encode(
                json.dumps({**good, "iss": [ISSUER]}).encode(), rsa_key.key, algorithm="RS256", headers={"kid": "rsa-1"}
            ),
        }
        for reason, token in refusals.items():
            caplog.clear()
            error = await login(g, token, 401)
            assert reason in error, (reason, error)
            logged = [r.getMessage() for r in caplog.records if "OpenID Connect login refused" in r.getMessage()]
            assert len(logged) == 1 and reason in logged[0], (reason, logged)
        assert await user_count(g) == users  # no refusal made a repository
        assert "must be a JWT" in await login(g, 12345, 401)


async def test_oidc_keys_served_over_http_are_refreshed_on_an_unknown_kid(tmp_path):
    old, new = Signer("RSA", "2026-a"), Signer("EC", "2026-b")
    doc = {"keys": [old.jwk()]}
    with jwks_server(doc) as (url, fetches):
        async with gateway(tmp_path, oidc=[provider(url)]) as g:
            first = await login(g, old.token())
            assert len(fetches) == 1
            await login(g, old.token())
            assert len(fetches) == 1  # cached
            # the provider rotates its keys: a token by the new key makes one fetch
            doc["keys"] = [old.jwk(), new.jwk()]
            assert (await login(g, new.token()))["key"] == first["key"]
            assert len(fetches) == 2
            # a kid the provider never had: fetched again, then refused
            assert "'forged'" in await login(g, new.token(kid="forged"), 401)
            assert len(fetches) == 3


async def test_unknown_kids_refetch_keys_at_most_once_per_interval(tmp_path):
    key = Signer("EC", "k1")
    doc = {"keys": [key.jwk()]}
    with jwks_server(doc) as (url, fetches):
        async with gateway(tmp_path, oidc=[provider(url, jwks_min_refresh=3600.0)]) as g:
            await login(g, key.token())
            for i in range(5):
                await login(g, key.token(kid=f"forged-{i}"), 401)
            assert len(fetches) == 1  # forged kids cannot make the gateway hammer the provider


async def test_oidc_is_refused_when_no_provider_is_configured(tmp_path):
    key = Signer("RSA", "k")
    async with gateway(tmp_path) as g:
        assert "not configured" in await login(g, key.token(), 401)
        assert await user_count(g) == 0


def test_a_provider_config_must_be_complete_and_asymmetric(tmp_path):
    from pttd.config import load

    def conf(text: str):
        path = tmp_path / "c.toml"
        path.write_text(text)
        return load(str(path))

    good = '[[oidc]]\nname = "G"\nissuer = "https://i"\nclient_id = "c"\njwks = "/k.json"\n'
    assert conf(good).oidc[0].algorithms == ["RS256", "ES256"]
    with pytest.raises(ConfigError, match="jwks is required"):
        conf('[[oidc]]\nname = "G"\nissuer = "https://i"\nclient_id = "c"\n')
    with pytest.raises(ConfigError, match="HS256"):
        conf(good + 'algorithms = ["HS256"]\n')
    with pytest.raises(ConfigError, match="unknown setting 'secret'"):
        conf(good + 'secret = "x"\n')
    with pytest.raises(ConfigError, match="names must differ"):
        conf(good + good)
    with pytest.raises(ConfigError, match="plain http:// only from this machine"):
        conf(good.replace('"/k.json"', '"http://keys.example/jwks"'))
    assert conf(good.replace('"/k.json"', '"http://127.0.0.1:8080/jwks"')).oidc[0].jwks.startswith("http://127")


async def test_an_unreachable_provider_refuses_logins_and_says_why(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = Signer("RSA", "k1")
    async with gateway(tmp_path, oidc=[provider(f"http://127.0.0.1:{port}/certs")]) as g:
        assert "not one of Test ID's keys" in await login(g, key.token(), 401)
        assert any("cannot read keys" in r.getMessage() for r in caplog.records)
        assert await user_count(g) == 0
