"""API-key authentication for REST and gRPC, one tenant per key.

A key looks like ``lmk_<key_id>_<secret>``. Only ``key_id`` and a scrypt hash
of the whole key are stored, so a leaked key file does not leak keys. scrypt
is slow on purpose; it runs on a small dedicated thread pool so neither the
event loop nor the default executor waits on it, and a verified key is
remembered (by its SHA-256, in memory, for ``cache_ttl_s``) so honest clients
pay the KDF once, not per request.

Failed attempts are counted per client (IP or gRPC peer host), but a key
that verifies is not refused for other keys' failures, so a neighbour behind
the same address cannot lock honest clients out:

- a key verified recently is recognised by its SHA-256 in the cache and
  passes before the limiter is consulted (no KDF);
- a client over the limit is refused with RESOURCE_EXHAUSTED for every other
  key *before* any hash is computed, except a key whose ``key_id`` exists and
  has not itself failed ``max_failures`` times from that client: only that
  one runs the KDF. Failures are counted per client and per (client, key_id),
  so the KDF work one address can cause stays bounded by the keys it can name,
  and malformed or unknown keys never cost a hash at all. The one key still
  refused is an uncached one whose own key_id was guessed at from the same
  address past the limit: telling it from those guesses takes the hash.

CLI: ``python -m services.common.auth create-key --tenant acme --role developer``
prints a new key once and appends its hash to ``data/credentials/api_keys.json``;
``list-keys``, ``disable-key ID`` and ``rotate-key ID [--grace-s S]`` manage them
(a rotation leaves the old key valid for the grace period, so two are valid at once).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common import errors

KEY_PREFIX = "lmk"
# scrypt cost: 2**14 * 8 * 128 bytes = 16 MiB and ~50 ms per hash on one core.
DEFAULT_SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_HASH_SCHEME = "scrypt"

#: The caller of the current RPC, set by interceptors.AuthInterceptor.
principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("llmesh_principal", default=None)


#: Roles a client key can hold, weakest first: a request may name a role up to
#: its key's, never above (policy files may define more; those match exactly).
ROLE_ORDER: tuple[str, ...] = ("viewer", "developer", "admin")
DEFAULT_ROLE = "developer"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a client key of one tenant, or a service of the mesh.

    ``service`` is empty for clients. A service may act for a client, in which
    case the receiving side's effective principal is the client's with ``via``
    naming the service that forwarded it.
    """

    tenant_id: str
    key_id: str
    role: str = DEFAULT_ROLE
    service: str = ""
    via: str = ""

    @property
    def is_service(self) -> bool:
        return bool(self.service)

    @property
    def name(self) -> str:
        """How tables and refusals name this caller: ``service:<name>`` or ``client``."""
        return f"service:{self.service}" if self.service else "client"


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    key_hash: str
    disabled: bool = False
    role: str = DEFAULT_ROLE
    # The mesh service this key identifies; empty for a client key.
    service: str = ""
    # Unix time after which the key is refused (set on the old key by a rotation).
    expires_at: float | None = None
    created_at: float = 0.0

    def usable(self, now: float) -> bool:
        return not self.disabled and (self.expires_at is None or now < self.expires_at)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant_id": self.tenant_id, "hash": self.key_hash,
                "disabled": self.disabled, "role": self.role, "service": self.service,
                "expires_at": self.expires_at, "created_at": self.created_at}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ApiKeyRecord:
        expires = raw.get("expires_at")
        return cls(key_id=str(raw["key_id"]), tenant_id=str(raw.get("tenant_id", "")), key_hash=str(raw["hash"]),
                   disabled=bool(raw.get("disabled", False)), role=str(raw.get("role") or DEFAULT_ROLE),
                   service=str(raw.get("service") or ""),
                   expires_at=float(expires) if expires is not None else None,
                   created_at=float(raw.get("created_at") or 0.0))


def hash_api_key(key: str, *, n: int = DEFAULT_SCRYPT_N, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash``; the parameters travel with the hash so they can change later."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)
    return "$".join([_HASH_SCHEME, str(n), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_api_key(key: str, key_hash: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = key_hash.split("$")
        if scheme != _HASH_SCHEME:
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        actual = hashlib.scrypt(key.encode(), salt=salt, n=int(n), r=int(r), p=int(p),
                                maxmem=64 * 1024 * 1024, dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def split_api_key(key: str) -> str | None:
    """The key_id of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def generate_api_key(tenant_id: str, *, n: int = DEFAULT_SCRYPT_N, role: str = DEFAULT_ROLE,
                     service: str = "") -> tuple[str, ApiKeyRecord]:
    """A fresh key (shown once) and the record to store.

    A client key belongs to one tenant; a service key (``service`` set) to none.
    """
    if service:
        errors.require(not tenant_id, "tenant_id", "a service key belongs to no tenant")
    else:
        errors.require(bool(tenant_id), "tenant_id", "must not be empty")
    errors.require(bool(role) and role.replace("-", "").replace("_", "").isalnum(), "role",
                   "must be a non-empty word")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(key_id=key_id, tenant_id=tenant_id, key_hash=hash_api_key(key, n=n),
                             role="service" if service else role, service=service, created_at=time.time())


class ApiKeyStore:
    """Key records by key_id, given in code or backed by a JSON file.

    A file-backed store notices changes made by other processes (the CLI, a
    service creating its identity, a rotation) within ``reload_interval_s``:
    a disabled key is refused by every service within that time plus nothing,
    since cached verifications are re-checked against the record.
    """

    def __init__(self, records: Iterable[ApiKeyRecord] = (), *, path: Path | None = None,
                 reload_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._records = {r.key_id: r for r in records}
        self.path = path
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._checked_at = clock()
        self._stamp = self._file_stamp()
        self._lock = threading.Lock()

    def get(self, key_id: str) -> ApiKeyRecord | None:
        self._maybe_reload()
        record = self._records.get(key_id)
        if record is None and self.path is not None:
            # A key made a moment ago (CLI, a service's first start) is usable at once:
            # an unknown id costs one stat of the file, never a hash.
            self._maybe_reload(force=True)
            record = self._records.get(key_id)
        return record

    def records(self) -> list[ApiKeyRecord]:
        self._maybe_reload()
        return list(self._records.values())

    def add(self, record: ApiKeyRecord) -> None:
        self._records[record.key_id] = record

    def __len__(self) -> int:
        return len(self._records)

    @classmethod
    def load(cls, path: Path, **kwargs: Any) -> ApiKeyStore:
        return cls(_read_records(path), path=path, **kwargs)

    def save(self, path: Path | None = None) -> None:
        target = path or self.path
        if target is None:
            raise ValueError("a store given in code has no file to save to")
        _write_records(target, self._records.values())

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _maybe_reload(self, force: bool = False) -> None:
        if self.path is None or (not force and self._clock() - self._checked_at < self.reload_interval_s):
            return
        with self._lock:
            self._checked_at = self._clock()
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._records = {r.key_id: r for r in _read_records(self.path)}
            except (OSError, ValueError, KeyError):
                return  # a half-written file is never read (writes are atomic); keep the last good set
            self._stamp = stamp


def _read_records(path: Path) -> list[ApiKeyRecord]:
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [ApiKeyRecord.from_json(k) for k in data.get("keys", [])]


def _write_records(path: Path, records: Iterable[ApiKeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"keys": [r.to_json() for r in records]}, indent=2) + "\n", encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)


@contextlib.contextmanager
def locked_keys_file(path: Path) -> Iterator[dict[str, ApiKeyRecord]]:
    """Read-modify-write of a keys file under an exclusive lock, so that
    processes creating keys at the same time (services making their
    identities at start) never lose each other's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = {r.key_id: r for r in _read_records(path)}
        yield records
        _write_records(path, records.values())


class FailedAttemptLimiter:
    """At most ``max_failures`` failed attempts per client in a sliding ``window_s``."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def retry_after_ms(self, client: str) -> int:
        """0 if the client may try now, else how long until it may."""
        with self._lock:
            window = self._trimmed(client)
            if window is None or len(window) < self.max_failures:
                return 0
            return max(1, int((window[0] + self.window_s - self._clock()) * 1000))

    def record_failure(self, client: str) -> None:
        with self._lock:
            window = self._trimmed(client)
            if window is None:
                window = self._failures[client] = collections.deque()
                # Bounded memory under a flood of distinct clients: forget the oldest.
                while len(self._failures) > self.max_clients:
                    self._failures.popitem(last=False)
            window.append(self._clock())
            self._failures.move_to_end(client)

    def _trimmed(self, client: str) -> collections.deque[float] | None:
        window = self._failures.get(client)
        if window is None:
            return None
        horizon = self._clock() - self.window_s
        while window and window[0] <= horizon:
            window.popleft()
        return window


class ApiKeyAuthenticator:
    """Turns an ``Authorization`` value into a Principal, or raises."""

    def __init__(self, store: ApiKeyStore, limiter: FailedAttemptLimiter | None = None, *,
                 cache_ttl_s: float = 300.0, cache_size: int = 4096, kdf_threads: int = 2,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.limiter = limiter or FailedAttemptLimiter()
        self.cache_ttl_s = cache_ttl_s
        self.cache_size = cache_size
        self._clock = clock
        self._wall_clock = wall_clock
        self._verified: collections.OrderedDict[bytes, tuple[Principal, float]] = collections.OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=kdf_threads, thread_name_prefix="api-key-kdf")
        self._inflight: dict[tuple[int, bytes], asyncio.Future[bool]] = {}
        self.num_kdf_runs = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, authorization: str | None, client: str) -> Principal:
        key = bearer_token(authorization)
        if key is None:
            # Sending no key guesses nothing and costs no hash: it is not counted as a failed attempt.
            raise errors.Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                                         reason="API_KEY_MISSING")
        fingerprint = hashlib.sha256(key.encode()).digest()
        principal = self._cached(fingerprint)
        if principal is not None:
            return principal
        key_id = split_api_key(key)
        record = self.store.get(key_id) if key_id else None
        if record is None or not record.usable(self._wall_clock()):
            self._refuse_if_limited(client)
            self.limiter.record_failure(client)
            raise errors.Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        # An address over its limit may still verify a key it has not failed with:
        # the KDF is what the limit guards, and this key's own count bounds it.
        key_client = f"{client} {record.key_id}"
        self._refuse_if_limited(key_client)
        ok = await self._verify_once(fingerprint, key, record.key_hash)
        if not ok:
            self.limiter.record_failure(client)
            self.limiter.record_failure(key_client)
            raise errors.Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        principal = Principal(tenant_id=record.tenant_id, key_id=record.key_id, role=record.role,
                              service=record.service)
        self._verified[fingerprint] = (principal, self._clock() + self.cache_ttl_s)
        while len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)
        return principal

    async def _verify_once(self, fingerprint: bytes, key: str, key_hash: str) -> bool:
        """The KDF for ``key``, shared by every call that presents it while it runs:
        a burst of first calls with one key costs one hash, not one each."""
        loop = asyncio.get_running_loop()
        slot = (id(loop), fingerprint)
        pending = self._inflight.get(slot)
        if pending is None:
            self.num_kdf_runs += 1
            pending = loop.run_in_executor(self._executor, verify_api_key, key, key_hash)
            self._inflight[slot] = pending
            pending.add_done_callback(lambda _done: self._inflight.pop(slot, None))
        return await asyncio.shield(pending)

    def _refuse_if_limited(self, client: str) -> None:
        wait_ms = self.limiter.retry_after_ms(client)
        if wait_ms:
            raise errors.ResourceExhausted("too many failed authentication attempts; retry later",
                                           reason="AUTH_RATE_LIMITED", retry_after_ms=wait_ms)

    def _cached(self, fingerprint: bytes) -> Principal | None:
        """The principal of a recently verified key that is still usable, else None."""
        cached = self._verified.get(fingerprint)
        if cached is None or cached[1] <= self._clock():
            return None
        record = self.store.get(cached[0].key_id)
        if record is None or not record.usable(self._wall_clock()):
            return None
        return cached[0]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.auth",
                                     description="Manage the mesh's API keys (only their hashes are stored).")
    parser.add_argument("--keys-file", default="data/credentials/api_keys.json")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="create a client key for a tenant; prints it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", default=DEFAULT_ROLE, help=f"one of {', '.join(ROLE_ORDER)} or a policy role")
    sub.add_parser("list-keys", help="list key ids, tenants, roles and states (never the keys)")
    disable = sub.add_parser("disable-key", help="refuse a key from now on (within the services' reload time)")
    disable.add_argument("key_id")
    rotate = sub.add_parser("rotate-key", help="make a new key for the same tenant and role; the old one "
                                               "stays valid for --grace-s seconds, then is refused")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, default=86_400.0)
    # Accepted after the sub-command too, as in earlier releases.
    for p in (create, disable, rotate):
        p.add_argument("--keys-file", dest="keys_file_late", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = Path(getattr(args, "keys_file_late", None) or args.keys_file)
    if args.command == "list-keys":
        now = time.time()
        for r in ApiKeyStore.load(path).records():
            state = "disabled" if r.disabled else ("expired" if not r.usable(now) else "active")
            expires = "" if r.expires_at is None else time.strftime(" expires %Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime(r.expires_at))
            owner = f"service={r.service}" if r.service else f"tenant={r.tenant_id} role={r.role}"
            print(f"{r.key_id}  {owner}  {state}{expires}")
        return 0
    with locked_keys_file(path) as records:
        if args.command == "create-key":
            key, record = generate_api_key(args.tenant, role=args.role)
            records[record.key_id] = record
            print(key)
            return 0
        old = records.get(args.key_id)
        if old is None:
            print(f"no key with id {args.key_id!r} in {path}", file=sys.stderr)
            return 2
        if args.command == "disable-key":
            records[old.key_id] = dataclasses.replace(old, disabled=True)
            return 0
        if old.service:
            print("service keys are rotated by deleting the service's key file and restarting it", file=sys.stderr)
            return 2
        key, record = generate_api_key(old.tenant_id, role=old.role)
        records[record.key_id] = record
        records[old.key_id] = dataclasses.replace(old, expires_at=time.time() + max(0.0, args.grace_s))
        print(key)
        return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
