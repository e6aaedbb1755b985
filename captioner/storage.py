"""Object storage: image inputs given as URLs (``s3://bucket/photos/``, ``gs://...``, any fsspec protocol).

Local paths never come here: :func:`is_url` tells the two apart, and ``fsspec`` (with ``s3fs`` for ``s3://``, from
the ``captioner[ray]`` extra) is imported only when a URL is given, so the local engine needs neither.

Credentials and the endpoint come from the usual places of each protocol's library: for ``s3://`` the AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), ``~/.aws`` files or an instance role.
"""

from __future__ import annotations

import os
import re
from typing import Any

# A URL is "protocol://..." with a protocol of two or more letters (so a Windows "C:/" path is not one).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

# The environment variables that configure S3 access; the Ray engine hands these to its workers.
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
)


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://bucket/key``, ``memory://x``, ``file:///tmp/a.jpg``)."""
    return bool(_URL.match(path))


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it (``s3://bkt/a.jpg`` -> (S3FileSystem, ``bkt/a.jpg``)).

    Raises ``ValueError`` with the install hint when fsspec or the protocol's package (``s3fs``...) is missing.
    """
    try:
        import fsspec
    except ImportError as exc:
        raise ValueError(f"{url}: object-storage inputs need fsspec; pip install 'captioner[ray]'") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package is not installed
        raise ValueError(f"{url}: {exc}") from exc


def read_bytes(url: str) -> bytes:
    """The whole object at ``url``; a missing object raises ``FileNotFoundError`` naming the URL."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such image file: {url}") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"not a file: {url}") from exc


def url_exists(url: str) -> bool:
    """Whether ``url`` names an existing object or folder (False when it cannot be reached)."""
    try:
        fs, path = filesystem(url)
        return bool(fs.exists(path))
    except (OSError, ValueError):
        return False


def aws_environment() -> dict[str, str]:
    """The AWS settings of this process' environment (:data:`AWS_ENV_VARS` that are set)."""
    return {name: os.environ[name] for name in AWS_ENV_VARS if name in os.environ}
