"""A stand-in for FCM's HTTP v1 API and Google's OAuth2 token endpoint.

Routes, on one HTTPS server (HTTP/2 and HTTP/1.1, as Google serves both):

- ``POST /token``: the JWT-bearer grant (RFC 7523). The assertion must be an
  RS256 JWT signed by a service account this sandbox made or was given
  (:meth:`FcmSandbox.make_credentials`, :meth:`FcmSandbox.add_account`), with
  ``kid`` = its ``private_key_id``, ``iss`` = its ``client_email``, ``aud`` =
  its ``token_uri``, a ``scope``, ``exp - iat`` at most 3600 s and ``iat``
  not in the future beyond the allowed skew. Answers ``{"access_token",
  "expires_in", "token_type": "Bearer"}`` or ``400 invalid_grant`` with
  Google's descriptions (PROTOCOLS.md 2.2). Access tokens live
  ``token_lifetime_s``; :meth:`FcmSandbox.expire_tokens` ends them early.
- ``POST /v1/projects/{project}/messages:send``: answers, in this order,
  401 UNAUTHENTICATED without a live bearer token; 404 NOT_FOUND for a
  project nobody configured; 403 PERMISSION_DENIED when the token's service
  account may not send for the project (or lacks the FCM scope); 400
  INVALID_ARGUMENT for a malformed request (JSON, exactly one of
  token/topic/condition, string-only ``data``, reserved data keys, unknown
  fields, ``ttl`` as ``^\\d+(\\.\\d{1,9})?s$`` up to four weeks, Android
  priority, the 4096-byte size limit, 2048 for topics) with the
  ``google.rpc.BadRequest`` field violation; then the token's scenario;
  else ``200 {"name": "projects/{project}/messages/{id}"}``. Errors use
  the ``google.rpc.Status`` envelope with the ``FcmError`` detail of
  PROTOCOLS.md 2.4-2.5.

Scenario tokens (a registration token that starts with ``<scenario>-``;
any other well-formed token is delivered):

======================== =======================================================
``unregistered-…``       404 NOT_FOUND, FcmError UNREGISTERED
``invalid-token-…``      400 INVALID_ARGUMENT, FcmError INVALID_ARGUMENT ("The
                         registration token is not a valid FCM registration
                         token")
``sender-id-mismatch-…`` 403 PERMISSION_DENIED, FcmError SENDER_ID_MISMATCH
``third-party-auth-…``   401 UNAUTHENTICATED, FcmError THIRD_PARTY_AUTH_ERROR
                         with an ApnsError detail (403 InvalidProviderToken)
``internal-…``           500 INTERNAL, FcmError INTERNAL
``unavailable-…``        503 UNAVAILABLE, FcmError UNAVAILABLE, ``Retry-After``
``quota-…``              429 RESOURCE_EXHAUSTED, FcmError QUOTA_EXCEEDED,
                         ``Retry-After``: for the first ``quota_failures``
                         requests of that token, then delivered
``quota-plain-…``        the same 429s in the form without FcmError (ErrorInfo
                         RATE_LIMIT_EXCEEDED, as firebase-admin-go #719 shows)
``slow-…``               delivered after ``slow_s`` seconds
======================== =======================================================

A token outside FCM's alphabet (``A-Z a-z 0-9 _ : - .``, 16 to 4096
characters) is refused like ``invalid-token-…``. ``outage`` makes every send
answer 503 UNAVAILABLE (``outage_mode="503"``) or not answer for
``hang_s`` (``"hang"``); the token endpoint stays up. Each accepted message
is appended to ``accepted``; ``token_requests`` counts token requests.

The message checks are in :mod:`~pushstream.sandbox.fcm_message`, the token
endpoint in :mod:`~pushstream.sandbox.fcm_oauth`, and the answers (error
envelopes, the scenario table above) in :mod:`~pushstream.sandbox.fcm_answers`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import rsa

from pushstream.sandbox.certs import SandboxCerts
from pushstream.sandbox.fcm_answers import (
    SCENARIO_ANSWERS,
    Refusal,
    error_info,
    fcm_error,
    json_answer,
    rpc_error,
    scenario_of,
)
from pushstream.sandbox.fcm_message import check_message, parse_body
from pushstream.sandbox.fcm_oauth import (
    DEFAULT_TOKEN_LIFETIME_S,
    AccessToken,
    Account,
    grant_token,
    write_key_file,
)
from pushstream.sandbox.server import Request, Response, SandboxServer

DEFAULT_PROJECTS = ("sandbox-project", "sandbox-project-2")
MAX_ACCEPTED = 100_000  # records kept; older ones are dropped first

SCOPES = (
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
)
_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access "
    "token, login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class FcmSandbox:
    """The FCM stand-in: ``await handle(request)`` answers one request.

    ``base_url`` (``https://host:port``, set once the server listens) is what
    :meth:`make_credentials` points service accounts and settings at.
    ``clock`` gives epoch seconds, for assertions and token lifetimes;
    ``record=False`` keeps ``accepted`` empty (for load tests).
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        token_lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S,
        quota_failures: int = 1,
        retry_after_s: int = 1,
        slow_s: float = 30.0,
        hang_s: float = 3600.0,
        record: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url
        self.token_lifetime_s = token_lifetime_s
        self.quota_failures = quota_failures
        self.retry_after_s = retry_after_s
        self.slow_s = slow_s
        self.hang_s = hang_s
        self.record = record
        self.outage = False
        self.outage_mode: Literal["503", "hang"] = "503"
        self.accepted: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self.token_requests = 0
        self._clock = clock
        self._accounts: dict[str, Account] = {}
        self._tokens: dict[str, AccessToken] = {}
        self._quota_seen: Counter[str] = Counter()
        self._message_ids = 0

    # --- set-up --------------------------------------------------------------------

    def add_account(
        self,
        client_email: str,
        key_id: str,
        public_key: rsa.RSAPublicKey,
        token_uri: str,
        projects: Iterable[str],
    ) -> None:
        """Let a service account get tokens and send for ``projects``."""
        account = self._accounts.get(client_email)
        if account is None or account.key_id != key_id:
            account = Account(client_email, key_id, public_key, token_uri)
            self._accounts[client_email] = account
        account.token_uri = token_uri
        account.projects.update(projects)

    def write_service_account(
        self, path: Path, project_id: str, token_uri: str | None = None
    ) -> Path:
        """Write (or reuse) a service-account key file for ``project_id``.

        A key already at ``path`` is kept (its ``token_uri`` is updated), so a
        restarted sandbox keeps accepting a worker configured earlier. New
        keys are RSA 2048, made now; the file is readable by its owner only.
        """
        token_uri = token_uri or self._url("/token")
        info, key = write_key_file(path, project_id, token_uri)
        self.add_account(
            info["client_email"],
            info["private_key_id"],
            key.public_key(),
            token_uri,
            [project_id],
        )
        return path

    def make_credentials(
        self,
        folder: Path,
        token_uri: str | None = None,
        projects: Sequence[str] = DEFAULT_PROJECTS,
    ) -> dict[str, str]:
        """One service account per project, written into ``folder``; returns
        the PUSHSTREAM_* settings that point a worker at them and at this
        sandbox (``token_uri`` defaults to ``<base_url>/token``)."""
        entries = []
        for project in projects:
            path = self.write_service_account(
                folder / f"fcm-{project}.json", project, token_uri
            )
            entries.append({"project_id": project, "service_account_file": str(path)})
        values = {"PUSHSTREAM_FCM": json.dumps(entries)}
        if self.base_url:
            values["PUSHSTREAM_ENDPOINTS__FCM"] = self.base_url
        return values

    def expire_tokens(self) -> int:
        """End every access token issued so far; returns how many were live.
        Their next use answers 401 UNAUTHENTICATED."""
        now = self._clock()
        live = [t for t in self._tokens.values() if t.expires_at > now]
        for token in live:
            token.expires_at = now
        return len(live)

    def server(
        self, certs: SandboxCerts, host: str = "127.0.0.1", port: int = 0
    ) -> SandboxServer:
        """A :class:`SandboxServer` for this stand-in, offering HTTP/2 and
        HTTP/1.1 as FCM does (not started yet)."""
        return SandboxServer(
            host, port, certs.server_ssl_context(), self.handle, name="fcm"
        )

    # --- requests ------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """Answer one request (the :class:`SandboxServer` handler)."""
        path = req.path.partition("?")[0]
        if path == "/token":
            self.token_requests += 1
            response = grant_token(
                req, self._accounts, self._tokens, self.token_lifetime_s, self._clock
            )
            self.stats[f"token {response.status}"] += 1
            return response
        match = _SEND_PATH.match(path)
        if match is None or req.method != "POST":
            response = rpc_error(404, "NOT_FOUND", "Requested entity was not found.")
        else:
            response = await self._send(req, match.group(1))
        self.stats[f"send {response.status}"] += 1
        return response

    # --- messages:send -------------------------------------------------------------

    async def _send(self, req: Request, project: str) -> Response:
        if self.outage:
            if self.outage_mode == "hang":
                await asyncio.sleep(self.hang_s)
            return fcm_error(
                503, "UNAVAILABLE", "The service is currently unavailable."
            )
        try:
            self._authorize(req, project)
            body = parse_body(req.body)
            message = body["message"]
            check_message(message, len(req.body))
            token = message.get("token")
            if token is not None:
                scenario = await self._scenario(token)
                if scenario is not None:
                    return scenario
        except Refusal as refusal:
            return refusal.response

        if body.get("validate_only") is True:
            return json_answer(
                200, {"name": f"projects/{project}/messages/fake_message_id"}
            )
        self._message_ids += 1
        name = (
            f"projects/{project}/messages/0:{int(self._clock() * 1e6)}"
            f"%{self._message_ids:016x}"
        )
        if self.record:
            self._record(req, project, message, name)
        return json_answer(200, {"name": name})

    def _authorize(self, req: Request, project: str) -> None:
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        issued = self._tokens.get(value) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires_at <= self._clock():
            details = []
            if issued is not None:
                details.append(error_info("ACCESS_TOKEN_EXPIRED", "googleapis.com"))
            raise Refusal(rpc_error(401, "UNAUTHENTICATED", _UNAUTHENTICATED, details))
        if not any(project in a.projects for a in self._accounts.values()):
            raise Refusal(
                rpc_error(404, "NOT_FOUND", "Requested entity was not found.")
            )
        account = self._accounts.get(issued.client_email)
        if not issued.scopes.intersection(SCOPES):
            raise Refusal(
                rpc_error(
                    403,
                    "PERMISSION_DENIED",
                    "Request had insufficient authentication scopes.",
                    [error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", "googleapis.com")],
                )
            )
        if account is None or project not in account.projects:
            raise Refusal(
                rpc_error(
                    403,
                    "PERMISSION_DENIED",
                    "Permission 'cloudmessaging.messages.create' denied on resource "
                    f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                    "(or it may not exist).",
                    [error_info("IAM_PERMISSION_DENIED", "iam.googleapis.com")],
                )
            )

    async def _scenario(self, token: str) -> Response | None:
        """The scripted answer of a scenario token, or None to deliver."""
        kind = scenario_of(token)
        if kind in ("quota", "quota-plain"):
            self._quota_seen[token] += 1
            if self._quota_seen[token] > self.quota_failures:
                return None
        if kind == "slow":
            await asyncio.sleep(self.slow_s)
            return None
        answer = SCENARIO_ANSWERS.get(kind) if kind else None
        if answer is None:
            return None
        code, error_code, status, message, details, throttles = answer
        headers = [("retry-after", str(self.retry_after_s))] if throttles else []
        if error_code is None:
            return rpc_error(code, status, message, details, headers=headers)
        return fcm_error(code, error_code, message, status, details, headers=headers)

    def _record(
        self, req: Request, project: str, message: dict[str, Any], name: str
    ) -> None:
        headers = {k: v for k, v in req.headers.items() if k != "authorization"}
        self.accepted.append(
            {
                "platform": "fcm",
                "token": message.get("token"),
                "topic": message.get("topic"),
                "condition": message.get("condition"),
                "app": project,
                "provider_id": name,
                "headers": headers,
                "message": message,
                "body_size": len(req.body),
                "http_version": req.http_version,
                "time": time.time(),
            }
        )
        if len(self.accepted) > MAX_ACCEPTED:
            del self.accepted[: len(self.accepted) - MAX_ACCEPTED]

    def _url(self, path: str) -> str:
        if not self.base_url:
            raise ValueError("FcmSandbox.base_url is not set: give the token_uri")
        return self.base_url.rstrip("/") + path
