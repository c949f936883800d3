"""Certificates made by the tests: a cluster CA with one certificate per service kind and one
for clients, and a foreign CA whose certificates the cluster must refuse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelyard.settings import TLSSettings
from modelyard.tls import CLIENT_KIND, SERVICE_KINDS, ClientTLS, IssuedCertificate, LocalCA


@dataclass
class Pki:
    """The test cluster's CA and what it issued.

    Usage::

        pki = Pki.make(tmp_path)
        settings = pki.settings("registry")          # mTLS listener + channels of a registry
        channel = open_channel(address, pki.client("client"))
    """

    ca: LocalCA
    foreign: LocalCA
    certs: dict[str, IssuedCertificate]

    @classmethod
    def make(cls, directory: Path) -> Pki:
        ca = LocalCA.create(directory / "ca")
        foreign = LocalCA.create(directory / "foreign", name="Someone else's CA")
        certs = {kind: ca.issue(kind) for kind in (*SERVICE_KINDS, CLIENT_KIND)}
        # A certificate that says "gateway", signed by the wrong CA.
        certs["foreign-gateway"] = foreign.issue("gateway", name="foreign-gateway")
        return cls(ca, foreign, certs)

    def settings(self, kind: str, *, client_auth_required: bool = True) -> TLSSettings:
        cert = self.certs[kind]
        return TLSSettings(
            enabled=True,
            cert_file=cert.cert_file,
            key_file=cert.key_file,
            ca_file=self.ca.cert_file,
            client_auth_required=client_auth_required,
        )

    def client(self, kind: str | None = CLIENT_KIND, *, ca: LocalCA | None = None) -> ClientTLS:
        """What a client of `kind` dials with (None: no client certificate)."""
        root = (ca or self.ca).cert_file
        if kind is None:
            return ClientTLS(ca_file=root)
        cert = self.certs[kind]
        return ClientTLS(ca_file=root, cert_file=cert.cert_file, key_file=cert.key_file)
