"""How the batch talks to a PACS over DICOMweb: the server's URL and the credentials a hospital needs.

Credentials never come from the command line (it shows in ``ps`` and in the run's manifest):
the password comes from ``--password-file`` or ``DICOMWEB_PASSWORD``, a bearer token from
``--token-file`` or ``DICOMWEB_TOKEN``. A URL with ``user:password@`` in it is refused for the
same reason. Nothing here prints or records a secret; the settings' ``repr`` hides them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PASSWORD_VARIABLE = "DICOMWEB_PASSWORD"
TOKEN_VARIABLE = "DICOMWEB_TOKEN"
DEFAULT_TIMEOUT_S = 300.0
"""A PACS that does not answer within this many seconds fails the request (the case, not the run)."""


class DicomwebError(OSError):
    """The PACS refused or failed a request; the message names the server, the study and the fix."""


@dataclass(frozen=True)
class DicomwebSettings:
    """The DICOMweb root URL (``.../dicom-web``) and optional basic or bearer authentication."""

    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DicomwebError(
                f"--dicomweb {self.url!r}: give the server's DICOMweb root, e.g. https://pacs/dicom-web"
            )
        if parts.username or parts.password:
            raise DicomwebError(
                "--dicomweb: the URL holds credentials; remove them and use --user with "
                f"{PASSWORD_VARIABLE} (or --password-file), or {TOKEN_VARIABLE} (or --token-file)"
            )
        if self.username and not self.password:
            raise DicomwebError(
                f"--user {self.username}: no password: set {PASSWORD_VARIABLE} or pass --password-file"
            )
        if self.username and self.token:
            raise DicomwebError("give either --user (basic) or a bearer token, not both")

    @property
    def root(self) -> str:
        return self.url.rstrip("/")

    def session(self) -> Any:
        """A ``requests`` session that authenticates every request and never waits forever."""
        import requests

        timeout = self.timeout

        class _Session(requests.Session):
            def request(self, *args: Any, **kwargs: Any) -> Any:
                kwargs.setdefault("timeout", timeout)
                return super().request(*args, **kwargs)

        session = _Session()
        if self.username:
            session.auth = (self.username, self.password)
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def client(self) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` on this server (QIDO-RS, WADO-RS, STOW-RS)."""
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.root, session=self.session())


def _secret(file: Path | None, variable: str, environ: dict[str, str]) -> str:
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise DicomwebError(
                f"cannot read {file}: {error.strerror}; check the path and its permissions"
            ) from error
    return environ.get(variable, "").strip()


def settings_from_options(
    url: str,
    *,
    username: str = "",
    password_file: Path | None = None,
    token_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> DicomwebSettings:
    """Settings from the batch's options, reading secrets from files or the environment."""
    environ = dict(os.environ if environ is None else environ)
    return DicomwebSettings(
        url,
        username=username,
        password=_secret(password_file, PASSWORD_VARIABLE, environ) if username else "",
        token=_secret(token_file, TOKEN_VARIABLE, environ) if token_file or not username else "",
    )
