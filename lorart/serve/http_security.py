"""The server's two guards: bearer-token auth, and confinement of runtime adapter loads.

- ``BearerAuth`` is a plain ASGI middleware (not a route dependency) so it covers every
  path, including unknown ones, and never buffers a streaming response. ``/health``
  stays open so a load balancer can probe without the key.
- ``confine_adapter_path`` decides which directory a ``/v1/load_lora_adapter`` may read:
  only inside a ``--adapter-dir``, judged on the fully resolved path (``..`` and every
  symlink followed), and the engine is handed that resolved path, so a link swapped
  after the check cannot redirect the load.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .http_errors import APIError

OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    """ASGI middleware: every HTTP request outside ``OPEN_PATHS`` needs
    ``Authorization: Bearer <api_key>``, else 401 in OpenAI's error shape."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if secrets.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await error.response()(scope, receive, send)


def confine_adapter_path(lora_path: str, adapter_dirs: list[Path]) -> Path:
    """The resolved directory ``lora_path`` names, if it lies inside one of ``adapter_dirs``.

    A relative ``lora_path`` is taken relative to each adapter directory in turn (the
    first that exists wins), so clients can name adapters without knowing where the
    server keeps them. Raises ``APIError`` 403 when the resolved path leaves every
    adapter directory (before saying whether it exists: no probing of the file system
    from outside), 404 when it is inside but does not exist.
    """
    if not adapter_dirs:
        raise APIError(403, "runtime adapter loads need the server started with --adapter-dir "
                            "DIR; none was given", param="lora_path", code="path_not_allowed")
    if "\x00" in lora_path:
        raise APIError(400, "lora_path contains a NUL byte", param="lora_path")
    roots = [Path(os.path.realpath(d)) for d in adapter_dirs]
    given = Path(lora_path).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    resolved = [Path(os.path.realpath(c)) for c in candidates]
    inside = [r for r in resolved if any(r == root or root in r.parents for root in roots)]
    if not inside:
        raise APIError(403, f"lora_path {lora_path!r} is outside the server's --adapter-dir "
                            f"directories", param="lora_path", code="path_not_allowed")
    for path in inside:
        if path.exists():
            return path
    raise APIError(404, f"lora_path {lora_path!r} does not exist", param="lora_path",
                   code="adapter_path_not_found")
