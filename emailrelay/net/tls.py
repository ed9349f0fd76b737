"""TLS contexts for the SMTP/POP servers and the SMTP client.

`server_context(cfg)` and `client_context(cfg)` turn the --server-tls... and
--client-tls... options (and --tls-config) into `ssl.SSLContext` objects, or
None when TLS is not configured for that side. Configuration mistakes raise
ValueError (bad keyword, missing certificate) or OSError (unreadable file)
with a message naming the option, so start-up can report them in one line.
`ssl` is imported only when a context is built.
"""

import os
import ssl

_VERSIONS = ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")
DEFAULT_CA = "<default>"


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _apply_tls_config(ctx, text):
    """Applies --tls-config keywords: `tlsv1.x` minimum, `-tlsv1.x` maximum.

    `openssl` is accepted (it is the only library); anything else is a
    ValueError, never silently ignored.
    """
    names = {"tlsv1.0": ssl.TLSVersion.TLSv1, "tlsv1.1": ssl.TLSVersion.TLSv1_1,
             "tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}
    for value in _as_list(text):
        for word in value.split(","):
            word = word.strip().lower()
            if not word or word == "openssl":
                continue
            if word in names:
                ctx.minimum_version = names[word]
            elif word.startswith("-") and word[1:] in names:
                ctx.maximum_version = names[word[1:]]
            else:
                raise ValueError("--tls-config: unknown keyword %r (expected openssl, %s or "
                                 "-tlsv1.x)" % (word, ", ".join(_VERSIONS)))


def _load_certificate(ctx, files, option):
    """One PEM holding key and chain, or two files: key first, then certificate."""
    files = _as_list(files)
    if not files:
        return
    if len(files) > 2:
        raise ValueError("%s: give one file (key and certificate) or two (key, then "
                         "certificate)" % option)
    try:
        if len(files) == 1:
            ctx.load_cert_chain(certfile=files[0])
        else:
            ctx.load_cert_chain(certfile=files[1], keyfile=files[0])
    except OSError as e:
        raise ValueError("%s %s: %s" % (option, " ".join(files), _file_error(e))) from None


def _file_error(e):
    """An OSError or ssl.SSLError from loading a file, as a short reason."""
    if isinstance(e, ssl.SSLError):
        return "not a usable PEM key and certificate (%s)" % (e.reason or e)
    return e.strerror or str(e)


def _load_verify(ctx, ca, purpose):
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca == DEFAULT_CA:
        ctx.load_default_certs(purpose)
    elif os.path.isdir(ca):
        ctx.load_verify_locations(capath=ca)
    else:
        try:
            ctx.load_verify_locations(cafile=ca)
        except OSError as e:
            raise ValueError("CA file %s: %s" % (ca, _file_error(e))) from None


def server_context(cfg):
    """The server-side context, or None without --server-tls/--server-tls-connection.

    With --server-tls-verify, clients must present a certificate signed by
    one of the given CAs.
    """
    if not (cfg.server_tls or cfg.server_tls_connection):
        return None
    if not _as_list(cfg.server_tls_certificate):
        raise ValueError("--server-tls needs --server-tls-certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_tls_config(ctx, cfg.tls_config)
    _load_certificate(ctx, cfg.server_tls_certificate, "--server-tls-certificate")
    if cfg.server_tls_verify:
        _load_verify(ctx, cfg.server_tls_verify, ssl.Purpose.CLIENT_AUTH)
    return ctx


def client_context(cfg):
    """The client-side context, or None when client TLS is not configured.

    Without --client-tls-verify the server certificate is not checked, as
    E-MailRelay does; with it, the chain must verify against the given CAs
    (`<default>`: the system's). The --client-tls-verify-name check is done
    after the handshake by `check_name()`.
    """
    if not (cfg.client_tls or cfg.client_tls_connection or cfg.client_tls_required):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _apply_tls_config(ctx, cfg.tls_config)
    _load_certificate(ctx, cfg.client_tls_certificate, "--client-tls-certificate")
    if cfg.client_tls_verify:
        _load_verify(ctx, cfg.client_tls_verify, ssl.Purpose.SERVER_AUTH)
    elif cfg.client_tls_verify_name:
        raise ValueError("--client-tls-verify-name needs --client-tls-verify")
    return ctx


def certificate_names(cert):
    """The subject CN and DNS subjectAltName values of a `getpeercert()` dict."""
    names = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    names += [v for (k, v) in cert.get("subjectAltName", ()) if k == "DNS"]
    return names


def check_name(sslsock, name):
    """Raises ValueError unless the verified peer certificate names `name`.

    The CN or a DNS subjectAltName must equal `name` (case-insensitive).
    """
    cert = sslsock.getpeercert() or {}
    names = certificate_names(cert)
    if name.lower() not in [n.lower() for n in names]:
        raise ValueError("server certificate names %s, not %r"
                         % (", ".join(repr(n) for n in names) or "nothing", name))
