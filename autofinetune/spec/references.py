"""References to other studies, as ``search.warm_start`` and ``launch --warm-start`` give them.

A reference is ``NAME`` (a study in the same study database) or ``NAME@URL`` (a study in the
database at the SQLAlchemy ``URL``). A study name never holds ``@`` (see
:class:`~autofinetune.spec.StudySpec`), so the first ``@`` ends the name even where the URL
has a user (``postgresql+psycopg://me@host/db``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
ALLOWED_REFERENCE = "NAME (a study in the same database) or NAME@URL (e.g. digits@sqlite:///other.db)"


class StudyReference(NamedTuple):
    """One study another study refers to: its name, and its database's URL (``None``: the same)."""

    name: str
    url: str | None

    def __str__(self) -> str:
        return self.name if self.url is None else f"{self.name}@{self.url}"


def parse_study_reference(text: str) -> StudyReference:
    """Parse ``NAME`` or ``NAME@URL``.

    Raises:
        ValueError: not of that form, or the URL holds a password: the spec is stored on the
            study (and shown by the dashboard), so a password must come from the database
            driver's own means (``PGPASSWORD``, ``~/.pgpass``).
    """
    name, at, url = text.strip().partition("@")
    if not _NAME.fullmatch(name) or (at and "://" not in url):
        raise ValueError(f"got {text!r}; a reference is {ALLOWED_REFERENCE}")
    if at and _has_password(url):
        raise ValueError(
            f"got {_redacted(text)!r}; a URL here must not hold a password, since the spec is stored on the "
            "study: give it through the driver (PGPASSWORD, ~/.pgpass) instead"
        )
    return StudyReference(name, url if at else None)


def _has_password(url: str) -> bool:
    _, _, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    return bool(at) and ":" in userinfo.split("/")[0]


def _redacted(text: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
