"""TLS and mTLS credentials for the gRPC listener, re-read when the files change.

Certificates are rotated by replacing files on disk (cert-manager, Kubernetes
secret volumes), so the server must not need a restart to pick them up. gRPC
asks the fetcher for a configuration before every TLS handshake; the fetcher
compares the files' modification stamps with those it loaded and re-reads
only on a change, so a handshake costs three ``stat`` calls. A half-written
rotation (a key that does not fit the new certificate, an unreadable file)
keeps the previous configuration serving and is logged, never crashes a
handshake.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger(__name__)

# What identifies one version of a file: rotation by rename changes the inode,
# rewriting in place changes mtime or size.
_Stamp = tuple[int, int, int, int]


class TlsConfigError(Exception):
    """The configured certificate files cannot be read or do not form a usable pair."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (self.cert, self.key, self.client_ca)
        )


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def _check(files: TlsFiles) -> None:
    """Fail early on unparsable PEM or a key that does not belong to the certificate.

    gRPC would accept such files and then fail every handshake; checking here
    (with the standard library, no extra dependency) turns a bad rotation into
    "keep the old certificate" instead.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
        if files.client_ca is not None:
            context.load_verify_locations(cafile=files.client_ca)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"unusable certificate, key or client CA: {exc.reason}") from None
    except OSError as exc:
        raise TlsConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None


class ReloadingCredentials:
    """Holds the current certificate configuration and swaps it when the files change."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamps, configuration = self._load()
        self.initial = configuration
        self.reloads = 0

    def _load(self) -> tuple[tuple[_Stamp, ...], grpc.ServerCertificateConfiguration]:
        try:
            stamps = tuple(_stamp(p) for p in self._files.paths)
            cert = self._files.cert.read_bytes()
            key = self._files.key.read_bytes()
            client_ca = (
                None if self._files.client_ca is None else self._files.client_ca.read_bytes()
            )
        except OSError as exc:
            raise TlsConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        _check(self._files)
        return stamps, grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration, or None for no change."""
        try:
            stamps = tuple(_stamp(p) for p in self._files.paths)
        except OSError:
            return None  # mid-rotation: a file is briefly missing; keep serving the old one
        with self._lock:
            if stamps == self._stamps:
                return None
            try:
                self._stamps, configuration = self._load()
            except TlsConfigError as exc:
                # Remember the bad stamps so the warning is logged once per change.
                self._stamps = stamps
                log.warning(
                    "TLS files changed but cannot be used; keeping the previous certificate",
                    extra={"event": "tls_reload_failed", "error": str(exc)},
                )
                return None
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"event": "tls_reloaded"})
        return configuration


def server_credentials(
    cert: str, key: str, client_ca: str = ""
) -> tuple[grpc.ServerCredentials, ReloadingCredentials]:
    """Credentials for ``server.add_secure_port``; with a client CA, client certificates are
    required and verified against it (mTLS)."""
    files = TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    reloading = ReloadingCredentials(files)
    # grpc calls the fetcher before each handshake and keeps the current certificate when
    # it returns None (its documentation says so; the typeshed stub wants a configuration).
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], reloading.fetch)
    credentials = grpc.dynamic_ssl_server_credentials(
        reloading.initial,
        fetch,
        require_client_authentication=files.client_ca is not None,
    )
    return credentials, reloading
