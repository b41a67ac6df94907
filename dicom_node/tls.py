"""TLS contexts for the listening AE and for outbound sends (certificates from config.node.tls)."""
from __future__ import annotations

import ssl

from config.errors import UserError
from config.schema import TLSConfig


class TLSConfigError(UserError):
    """TLS is enabled but a certificate, key or CA file is missing; the message names it."""


def _check(tls: TLSConfig, *, need_cert: bool) -> None:
    for name in ("certificate", "private_key") if need_cert else ():
        path = getattr(tls, name)
        if path is None or not path.is_file():
            raise TLSConfigError(f"node.tls.{name} must name an existing file (got {path})")
    if tls.ca_certificates is not None and not tls.ca_certificates.is_file():
        raise TLSConfigError(f"node.tls.ca_certificates does not exist: {tls.ca_certificates}")


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Context for accepted associations, or None when TLS is off. TLS 1.2 minimum."""
    if not tls.enabled:
        return None
    _check(tls, need_cert=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise TLSConfigError("node.tls.require_client_certificate needs node.tls.ca_certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Context for outbound associations when tls.enabled and tls.use_for_sends, else None.

    The peer certificate is verified against ca_certificates (or the system store); host names are
    checked. Our certificate is presented when configured (for peers that require client certs).
    """
    if not (tls.enabled and tls.use_for_sends):
        return None
    _check(tls, need_cert=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        ctx.load_default_certs()
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx
