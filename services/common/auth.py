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

CLI: ``python -m services.common.auth create-key --tenant acme --keys-file data/api_keys.json``
prints a new key once and appends its hash to the file.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextvars
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from services.common import errors

KEY_PREFIX = "lmk"
# scrypt cost: 2**14 * 8 * 128 bytes = 16 MiB and ~50 ms per hash on one core.
DEFAULT_SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_HASH_SCHEME = "scrypt"

#: The caller of the current RPC, set by interceptors.AuthInterceptor.
principal_var: contextvars.ContextVar["Principal | None"] = contextvars.ContextVar("llmesh_principal", default=None)


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    key_hash: str
    disabled: bool = False


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


def generate_api_key(tenant_id: str, *, n: int = DEFAULT_SCRYPT_N) -> tuple[str, ApiKeyRecord]:
    """A fresh key (shown once) and the record to store."""
    errors.require(bool(tenant_id), "tenant_id", "must not be empty")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(key_id=key_id, tenant_id=tenant_id, key_hash=hash_api_key(key, n=n))


class ApiKeyStore:
    """Key records by key_id; loaded from a JSON file or given in code."""

    def __init__(self, records: Iterable[ApiKeyRecord] = ()) -> None:
        self._records = {r.key_id: r for r in records}

    def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._records.get(key_id)

    def add(self, record: ApiKeyRecord) -> None:
        self._records[record.key_id] = record

    def __len__(self) -> int:
        return len(self._records)

    @classmethod
    def load(cls, path: Path) -> "ApiKeyStore":
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"keys": []}
        return cls(ApiKeyRecord(key_id=k["key_id"], tenant_id=k["tenant_id"], key_hash=k["hash"],
                                disabled=bool(k.get("disabled", False))) for k in data.get("keys", []))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = [{"key_id": r.key_id, "tenant_id": r.tenant_id, "hash": r.key_hash, "disabled": r.disabled}
                for r in self._records.values()]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": keys}, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.limiter = limiter or FailedAttemptLimiter()
        self.cache_ttl_s = cache_ttl_s
        self.cache_size = cache_size
        self._clock = clock
        self._verified: collections.OrderedDict[bytes, tuple[Principal, float]] = collections.OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=kdf_threads, thread_name_prefix="api-key-kdf")
        self.num_kdf_runs = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, authorization: str | None, client: str) -> Principal:
        key = bearer_token(authorization)
        if key is None:
            self._refuse_if_limited(client)
            self.limiter.record_failure(client)
            raise errors.Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                                         reason="API_KEY_MISSING")
        fingerprint = hashlib.sha256(key.encode()).digest()
        principal = self._cached(fingerprint)
        if principal is not None:
            return principal
        key_id = split_api_key(key)
        record = self.store.get(key_id) if key_id else None
        if record is None or record.disabled:
            self._refuse_if_limited(client)
            self.limiter.record_failure(client)
            raise errors.Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        # An address over its limit may still verify a key it has not failed with:
        # the KDF is what the limit guards, and this key's own count bounds it.
        key_client = f"{client} {record.key_id}"
        self._refuse_if_limited(key_client)
        self.num_kdf_runs += 1
        ok = await asyncio.get_running_loop().run_in_executor(self._executor, verify_api_key, key, record.key_hash)
        if not ok:
            self.limiter.record_failure(client)
            self.limiter.record_failure(key_client)
            raise errors.Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        principal = Principal(tenant_id=record.tenant_id, key_id=record.key_id)
        self._verified[fingerprint] = (principal, self._clock() + self.cache_ttl_s)
        while len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)
        return principal

    def _refuse_if_limited(self, client: str) -> None:
        wait_ms = self.limiter.retry_after_ms(client)
        if wait_ms:
            raise errors.ResourceExhausted("too many failed authentication attempts; retry later",
                                           reason="AUTH_RATE_LIMITED", retry_after_ms=wait_ms)

    def _cached(self, fingerprint: bytes) -> Principal | None:
        """The principal of a recently verified key that is still enabled, else None."""
        cached = self._verified.get(fingerprint)
        if cached is None or cached[1] <= self._clock():
            return None
        record = self.store.get(cached[0].key_id)
        if record is None or record.disabled:
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


def make_grpc_interceptor(authenticator: ApiKeyAuthenticator) -> Any:
    """The gRPC server interceptor requiring an API key (``interceptors.AuthInterceptor``)."""
    from services.common.interceptors import AuthInterceptor

    return AuthInterceptor(authenticator)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="create an API key for a tenant and store its hash")
    create.add_argument("--tenant", required=True)
    create.add_argument("--keys-file", default="data/api_keys.json")
    args = parser.parse_args(argv)
    path = Path(args.keys_file)
    store = ApiKeyStore.load(path)
    key, record = generate_api_key(args.tenant)
    store.add(record)
    store.save(path)
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
