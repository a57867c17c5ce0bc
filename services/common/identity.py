"""Credentials of the mesh: service keys, client keys for local use, and TLS material.

Everything lives under one credentials directory (``data/credentials`` by
default; a Secret mounted read-only in Kubernetes):

- ``api_keys.json``: the hashes of every key, client and service alike;
- ``services/<name>.key``: a service's own key, made on its first start
  (mode 0600) and registered in ``api_keys.json`` under a file lock, so
  services starting together never lose each other's records;
- ``clients/<tenant>.<role>.key``: keys made for local use (``make run`` prints
  the one of tenant ``default``; tests make their own);
- ``tls/``: a local CA and a certificate per service and for local clients,
  made by ``init-tls`` (``make run TLS=1``) when TLS is on.

CLI: ``python -m services.common.identity init --services store,policy,...``
makes every service key at once (to fill a Kubernetes Secret), and
``init-tls`` the CA and certificates.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import ipaddress
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.auth import DEFAULT_ROLE, generate_api_key, locked_keys_file

KEYS_FILE = "api_keys.json"
MESH_SERVICES = ("store", "policy", "tools", "inference", "orchestrator", "gateway")
_lock = threading.Lock()
_cache: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one party: the CA it trusts and its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class Identity:
    """What a process presents when it calls another service."""

    name: str
    key: str | None
    tls: TlsFiles | None = None


def keys_path(credentials_dir: Path) -> Path:
    return credentials_dir / KEYS_FILE


def service_key(credentials_dir: Path, service: str) -> str:
    """The key of ``service``, made and registered on first use."""
    key_file = credentials_dir / "services" / f"{service}.key"
    return _key_from_file(credentials_dir, key_file, tenant="", role="service", service=service)


def client_key(credentials_dir: Path, tenant: str, role: str = DEFAULT_ROLE) -> str:
    """A client key of ``tenant`` with ``role`` kept for local use, made on first use."""
    key_file = credentials_dir / "clients" / f"{tenant}.{role}.key"
    return _key_from_file(credentials_dir, key_file, tenant=tenant, role=role, service="")


def _key_from_file(credentials_dir: Path, key_file: Path, *, tenant: str, role: str, service: str) -> str:
    cache_key = (str(credentials_dir.resolve()), str(key_file))
    with _lock:
        if cache_key in _cache:
            return _cache[cache_key]
        if not key_file.exists():
            with locked_keys_file(keys_path(credentials_dir)) as records:
                if not key_file.exists():  # another process may have made it while we waited
                    key, record = generate_api_key(tenant, role=role, service=service)
                    records[record.key_id] = record
                    _write_secret(key_file, key)
        key = key_file.read_text(encoding="utf-8").strip()
        _cache[cache_key] = key
        return key


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    tmp.replace(path)


# --- TLS ---------------------------------------------------------------------

def tls_dir(credentials_dir: Path) -> Path:
    return credentials_dir / "tls"


def tls_files(credentials_dir: Path, name: str) -> TlsFiles:
    """The CA and ``name``'s certificate (``name`` is a service or ``client``)."""
    d = tls_dir(credentials_dir)
    return TlsFiles(ca=d / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}-key.pem")


def init_tls(credentials_dir: Path, names: tuple[str, ...] = (*MESH_SERVICES, "client", "envoy"),
             hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> None:
    """A local CA and one certificate per name, valid for ``hosts`` and the name itself.

    Existing files are kept, so restarts reuse them; delete ``tls/`` to start over.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tls_dir(credentials_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_path, ca_key_path = d / "ca.pem", d / "ca-key.pem"
    with _exclusive(d / ".lock"):
        if ca_path.exists() and ca_key_path.exists():
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            ca_key = loaded
        else:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmesh local CA")])
            ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                       .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(minutes=5))
                       .not_valid_after(now + datetime.timedelta(days=3650))
                       .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                       .sign(ca_key, hashes.SHA256()))
            _write_secret_bytes(ca_key_path, pem_key(ca_key))
            ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        for name in names:
            files = tls_files(credentials_dir, name)
            if files.cert.exists() and files.key.exists():
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            sans: list[x509.GeneralName] = [x509.DNSName(name)]
            for host in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
            cert = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                    .issuer_name(ca_cert.subject).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=825))
                    .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                    .sign(ca_key, hashes.SHA256()))
            _write_secret_bytes(files.key, pem_key(key))
            files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_secret_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.identity", description=__doc__.splitlines()[0])
    parser.add_argument("--credentials-dir", default="data/credentials")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="make the key of each service (kept if it exists)")
    init.add_argument("--services", default=",".join(MESH_SERVICES))
    sub.add_parser("init-tls", help="make a local CA and a certificate per service and for clients")
    client = sub.add_parser("client-key", help="print a client key of a tenant kept for local use")
    client.add_argument("--tenant", default="default")
    client.add_argument("--role", default=DEFAULT_ROLE)
    args = parser.parse_args(argv)
    root = Path(args.credentials_dir)
    if args.command == "init":
        for name in [s.strip() for s in args.services.split(",") if s.strip()]:
            service_key(root, name)
            print(f"{name}: {root / 'services' / (name + '.key')}")
    elif args.command == "init-tls":
        init_tls(root)
        print(tls_dir(root))
    else:
        print(client_key(root, args.tenant, args.role))
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
