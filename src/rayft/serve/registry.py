"""The adapter registry: published adapters on disk (shared storage on a cluster).

    <root>/<tenant>/<name>/versions/<n>/   adapter_config.json, adapter_model.safetensors, rayft.json
    <root>/<tenant>/<name>/CURRENT         the version new requests use

A version directory never changes once renamed into place; publishing again adds a version and
flips CURRENT (written to a temporary name, then renamed). A served adapter is identified by
"tenant/name@n", so replacing one never disturbs requests that still run on the old version.
Tenant "shared" holds adapters every tenant may use.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from rayft.serve.validate import (CONFIG_FILE, META_FILE, WEIGHTS_FILE, AdapterError, AdapterSpec, BaseShape,
                                  check_fits_base, check_name, inspect_adapter)

SHARED_TENANT = "shared"
COPIED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str
    version: int
    path: Path

    @property
    def model_id(self) -> str:
        """The key a replica caches the loaded weights under (and Serve routes by)."""
        return f"{self.tenant}/{self.name}@{self.version}"

    def meta(self) -> dict:
        return json.loads((self.path / META_FILE).read_text())


class AdapterRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------ lookups
    def get(self, tenant: str, name: str) -> Optional[AdapterRef]:
        entry = self.root / tenant / name
        try:
            version = int((entry / "CURRENT").read_text().strip())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return AdapterRef(tenant, name, version, entry / "versions" / str(version))

    def resolve(self, tenant: str, name: str) -> Optional[AdapterRef]:
        """The adapter `name` as `tenant` sees it: its own first, then a shared one. None when
        missing or invalid, so another tenant's adapter looks exactly like a missing one."""
        if not is_safe_name(name):
            return None
        return self.get(tenant, name) or self.get(SHARED_TENANT, name)

    def path_of(self, model_id: str) -> Path:
        tenant_name, _, version = model_id.rpartition("@")
        tenant, _, name = tenant_name.partition("/")
        for part in (tenant, name):
            check_name(part)
        return self.root / tenant / name / "versions" / str(int(version))

    def list(self, tenant: Optional[str] = None) -> list[AdapterRef]:
        """Adapters `tenant` may use (its own and shared ones); every adapter when tenant is None."""
        tenants = [tenant, SHARED_TENANT] if tenant is not None else (
            sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_safe_name(p.name)) if self.root.is_dir() else [])
        refs = []
        for owner in dict.fromkeys(tenants):
            folder = self.root / owner
            if folder.is_dir():
                refs += [ref for entry in sorted(folder.iterdir()) if (ref := self.get(owner, entry.name))]
        return refs

    # ------------------------------------------------------------ changes
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def publish(self, spec: AdapterSpec, tenant: str, name: str, meta: dict) -> AdapterRef:
        """Copy a checked adapter in as the next version of tenant/name and make it current."""
        check_name(tenant, "tenant")
        check_name(name)
        with self._locked():
            versions = self.root / tenant / name / "versions"
            versions.mkdir(parents=True, exist_ok=True)
            existing = [int(p.name) for p in versions.iterdir() if p.name.isdigit()]
            version = max(existing, default=0) + 1
            staging = versions / f".tmp-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                for file in COPIED_FILES:
                    shutil.copy2(spec.path / file, staging / file)
                full_meta = {**spec.meta, **meta, "tenant": tenant, "name": name, "version": version,
                             "serve_kind": spec.kind, "rank": spec.rank, "virtual_tokens": spec.virtual_tokens,
                             "published_at": time.time()}
                (staging / META_FILE).write_text(json.dumps(full_meta, indent=2))
                os.replace(staging, versions / str(version))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            current = self.root / tenant / name / ".CURRENT.tmp"
            current.write_text(str(version))
            os.replace(current, self.root / tenant / name / "CURRENT")
        return AdapterRef(tenant, name, version, versions / str(version))

    def delete(self, tenant: str, name: str) -> bool:
        """Remove tenant/name from the registry; replicas that hold it keep serving the requests
        already running on it."""
        if not is_safe_name(name) or not is_safe_name(tenant):
            return False
        with self._locked():
            entry = self.root / tenant / name
            if not (entry / "CURRENT").is_file():
                return False
            trash = self.root / f".trash-{uuid.uuid4().hex[:8]}"
            os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True


def is_safe_name(name: str) -> bool:
    try:
        check_name(name)
        return True
    except AdapterError:
        return False


def publish_adapter(registry: AdapterRegistry, source: Path, tenant: str, name: str, base: BaseShape,
                    max_rank: int, max_bytes: int, meta: Optional[dict] = None) -> AdapterRef:
    """Check an adapter directory against the served base and publish it: the one way into the registry."""
    spec = inspect_adapter(source, max_rank, max_bytes)
    check_fits_base(spec, base)
    return registry.publish(spec, tenant, name, {"source": str(source), **(meta or {})})


def adapter_dir_of(source: Path) -> Path:
    """A training output directory holds its adapter in adapter/; an adapter directory is itself."""
    source = Path(source).expanduser()
    if (source / "adapter" / CONFIG_FILE).is_file():
        return source / "adapter"
    if (source / "model" / "config.json").is_file() and not (source / CONFIG_FILE).is_file():
        raise AdapterError(f"{source}: holds a full model (method full/freeze), not a LoRA adapter")
    return source
