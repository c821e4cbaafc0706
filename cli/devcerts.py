"""``swapmoe dev-certs DIR``: a development CA, a certificate per process and a token per role.

So TLS, mutual TLS and tokens are one flag away (``--security DIR``) without openssl recipes.
Each certificate is good only for what its process does (``USES``): the executor and the control
node serve and dial out (serverAuth and clientAuth), the planner only serves (serverAuth: it never
dials out), and clients only dial (clientAuth), so a stolen ``client.pem`` cannot pose as a
server. Every certificate names localhost, 127.0.0.1, ::1 and each ``--host``. Tokens are random;
the servers' ``tokens.json`` keeps their hashes only. Keys and tokens are owner-only (0600). For
development and tests: a production fleet uses its own CA and issues tokens from its own secret
store.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Sequence

from swapmoe.core.errors import InvalidField
from swapmoe.rpc.auth import ROLES, TOKEN_FORMAT, hash_token
from swapmoe.rpc.security import CERT_NAMES

# What each certificate may prove (its extended key usage): "server" as a TLS server, "client" as a TLS client.
USES = {"planner": ("server",), "executor": ("server", "client"), "fleet": ("server", "client"),
        "client": ("client",)}


def plan_files(directory: Path) -> list[Path]:
    """Every file ``make_dev_certs`` writes into ``directory``."""
    names = ["ca.pem", "ca-key.pem"]
    names += [f for cert in CERT_NAMES for f in (f"{cert}.pem", f"{cert}-key.pem")]
    names += [f"{role}.token" for role in sorted(ROLES)] + ["tokens.json"]
    return [directory / name for name in names]


def make_dev_certs(directory: Path, hosts: Sequence[str] = (), days: int = 365, force: bool = False) -> list[Path]:
    """Write the CA, the certificates, the tokens and ``tokens.json`` into ``directory``; the paths written.
    Files already there are an error unless ``force``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise InvalidField("--days", f"must be at least 1, not {days}")
    names = [_general_name(x509, host) for host in ("localhost", "127.0.0.1", "::1", *hosts)]
    directory = Path(directory)
    existing = [path for path in plan_files(directory) if path.exists()]
    if existing and not force:
        raise InvalidField("DIR", f"{directory} already holds {', '.join(p.name for p in existing)}; "
                                  "pass --force to replace them")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new directory holds keys: owner-only
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    written = []
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swapmoe development CA")])
    ca = certificate("swapmoe development CA", ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True),
    ])
    written += [_write(directory / "ca.pem", _cert_pem(ca)), _write(directory / "ca-key.pem", _key_pem(ca_key), 0o600)]
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    purposes = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
    for name in CERT_NAMES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(f"swapmoe {name}", key, ca.subject, ca_key, [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                           key_encipherment=False, data_encipherment=False, key_agreement=True,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([purposes[use] for use in USES[name]]), False),
            (x509.SubjectAlternativeName(names), False),
            (authority, False),
        ])
        written += [_write(directory / f"{name}.pem", _cert_pem(cert)),
                    _write(directory / f"{name}-key.pem", _key_pem(key), 0o600)]
    entries = []
    for role in sorted(ROLES):
        token = secrets.token_urlsafe(32)
        written.append(_write(directory / f"{role}.token", (token + "\n").encode(), 0o600))
        entries.append({"name": role, "sha256": hash_token(token), "roles": [role]})
    document = {"format": TOKEN_FORMAT, "tokens": entries}
    written.append(_write(directory / "tokens.json", (json.dumps(document, indent=2) + "\n").encode()))
    return written


def _general_name(x509, host: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() or c in "/:[]" for c in host):
            raise InvalidField("--host", f"{host!r} is neither an IP address nor a host name") from None
        return x509.DNSName(host)


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` with ``mode`` from the first byte on (a key is never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file (--force) keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def dev_certs(args) -> None:
    directory = Path(args.directory)
    written = make_dev_certs(directory, hosts=args.host, days=args.days, force=args.force)
    for path in written:
        print(f"wrote {path}")
    print(f"\nServe and call with TLS, mutual TLS and tokens:\n"
          f"  swapmoe planner serve --security {directory}\n"
          f"  swapmoe executor serve --model CHECKPOINT --budget 512MiB --planner localhost:50052 "
          f"--security {directory}\n"
          f"Clients take --security {directory} too (or --tls-ca/--tls-cert/--tls-key and --token-file).")


def add_parser(commands) -> None:
    """The ``dev-certs`` command, on the ``swapmoe`` parser's subcommands."""
    p = commands.add_parser("dev-certs", help="make a development CA, certificates and tokens for --security DIR")
    p.add_argument("directory", metavar="DIR", help="where to write them (created if missing)")
    p.add_argument("--host", action="append", default=[],
                   help="another name or IP address the certificates are valid for (repeatable; "
                        "localhost, 127.0.0.1 and ::1 always are)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="replace files already in DIR")
    p.set_defaults(func=dev_certs)
