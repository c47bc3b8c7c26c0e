"""Reaching a cluster's Jobs API: the dashboard address, Ray's token authentication, the client.

Ray's ``JobSubmissionClient`` is built only after one bounded request has shown that a Ray
dashboard answers, so an unreachable or wrong address is a quick, named error rather than a hang.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streamssl.jobs.spec import SubmitError


def normalize_address(address: str) -> str:
    """Dashboard URL with a scheme; the Jobs API speaks HTTP to the dashboard (port 8265)."""
    address = address.strip().rstrip("/")
    if not address:
        raise SubmitError("empty --address; pass the dashboard URL, e.g. http://127.0.0.1:8265")
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise SubmitError(f"address {address} must be the dashboard's http(s):// URL "
                          f"(e.g. http://127.0.0.1:8265), not a {scheme}:// address")
    return address


def _local_token() -> str | None:
    """The Ray auth token from the places Ray's own clients read it, in Ray's order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token
    return None


def _get(url: str, timeout_s: float, headers: dict[str, str]) -> Any:
    import requests

    hint = ("is the cluster up and the tunnel open? (`ray dashboard cluster/aws.yaml`, "
            "`kubectl port-forward svc/<cluster>-head-svc 8265:8265`)")
    address = url.rsplit("/api/", 1)[0]
    try:
        return requests.get(url, headers=headers, timeout=(timeout_s, timeout_s))
    except requests.exceptions.SSLError as e:
        raise SubmitError(f"TLS error talking to the Ray dashboard at {address}: {e}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.exceptions.Timeout) else "connection failed"
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({kind}); {hint}") from None


def probe(address: str, timeout_s: float = 5.0) -> tuple[str, dict[str, str]]:
    """Check that a Ray dashboard answers at ``address``: (its Ray version, auth headers to use).

    JobSubmissionClient's own requests have no timeout: a black-holed host would hang for the
    OS's TCP timeout (minutes). One bounded request first turns that into a quick, clear error.
    It also rejects a non-Ray answer (a proxy's 404 reads as "Jobs API not supported" there).
    Ray >= 2.5x clusters may use token authentication (the default for a local ``ray start``
    once ~/.ray/auth_token exists): only when the dashboard asks for it (401) is the token
    looked up where Ray keeps it and sent as a bearer header to this address.
    """
    url = f"{address}/api/version"
    headers: dict[str, str] = {}
    r = _get(url, timeout_s, headers)
    if r.status_code == 401:
        token = _local_token()
        if token is None:
            raise SubmitError(
                f"the Ray dashboard at {address} requires token authentication and no token was "
                "found: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the "
                "cluster's token (`ray get-auth-token` on the head node)")
        headers = {"Authorization": f"Bearer {token}"}
        r = _get(url, timeout_s, headers)
        if r.status_code in (401, 403):
            raise SubmitError(f"the Ray dashboard at {address} rejected the authentication token "
                              "(RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)")
    try:
        version = r.json()["ray_version"]
    except Exception:
        raise SubmitError(f"no Ray dashboard answered at {address} (HTTP {r.status_code} on "
                          "/api/version); is the address the dashboard's (port 8265 by default)?"
                          ) from None
    return str(version), headers


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client is built.

    JobSubmissionClient silently prefers those variables over its ``address`` argument; an
    explicit ``--address`` must win, or a job could land on a different cluster than named.
    """
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, timeout_s: float = 5.0) -> Any:
    """A JobSubmissionClient for ``address``, failing within about ``timeout_s`` if unreachable."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    _, headers = probe(address, timeout_s)
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=headers or None)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        raise SubmitError(f"Ray Jobs API at {address}: {e}") from None
