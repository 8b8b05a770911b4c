"""API keys: Bearer tokens mapped to tenants. Only a SHA-256 of each key is stored.

keys file (YAML):
    keys:
      - {sha256: <hex>, tenant: acme, admin: false, created: 1764000000.0}
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from rayft.errors import RayftError
from rayft.serve.validate import check_name

KEY_PREFIX = "rft-"
OPEN_TENANT = "default"  # every caller's tenant when the server runs without a keys file


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(keys_file: Path, tenant: str, admin: bool = False) -> str:
    """Append a new key for `tenant` and return it: the only time it is ever shown."""
    from rayft.serve.registry import SHARED_TENANT

    check_name(tenant, "tenant")
    if tenant == SHARED_TENANT:
        raise RayftError(f"tenant {SHARED_TENANT!r} is reserved for adapters every tenant may use")
    keys_file = Path(keys_file)
    entries = _read(keys_file) if keys_file.exists() else []
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entries.append({"sha256": _digest(key), "tenant": tenant, "admin": admin, "created": time.time()})
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    staging = keys_file.with_name(f".{keys_file.name}.tmp")
    staging.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    os.chmod(staging, 0o600)
    os.replace(staging, keys_file)
    return key


def _read(keys_file: Path) -> list[dict]:
    try:
        raw = yaml.safe_load(keys_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RayftError(f"keys file {keys_file}: cannot be read ({exc})") from None
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"sha256", "tenant"} <= e.keys() for e in entries):
        raise RayftError(f"keys file {keys_file}: expected 'keys:' with a list of {{sha256, tenant, admin}}")
    return entries


class KeyStore:
    """Looks up callers; re-reads the keys file when it changes, so new keys work without a restart."""

    def __init__(self, keys_file: Optional[str | Path]):
        self.keys_file = Path(keys_file) if keys_file else None
        self._mtime = None
        self._by_digest: dict[str, Caller] = {}
        if self.keys_file is not None:
            self._reload()

    def _reload(self) -> None:
        mtime = self.keys_file.stat().st_mtime_ns if self.keys_file.exists() else None
        if mtime == self._mtime:
            return
        entries = _read(self.keys_file) if mtime is not None else []
        self._by_digest = {e["sha256"]: Caller(str(e["tenant"]), bool(e.get("admin", False))) for e in entries}
        self._mtime = mtime

    def caller(self, authorization: Optional[str]) -> Optional[Caller]:
        """The caller a `Authorization: Bearer <key>` header names; None when unknown."""
        if self.keys_file is None:
            return Caller(OPEN_TENANT, admin=True)
        self._reload()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = _digest(key.strip())
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return caller
        return None
