"""CURVE set-up for cloud_server sockets: key files, the server side's authenticator, the client side's keys.

The broker secures its edge-facing and remote-worker sockets as a CURVE server; a remote worker
connects as a CURVE client. Both read zmq.auth certificate files here, so a bad file is the
same readable ConfigError on either side.
"""

from __future__ import annotations

import logging
import os

import zmq

from edgesplit.errors import ConfigError

__all__ = ["CurveServer", "ClientKeys", "load_keys"]

log = logging.getLogger(__name__)


def load_keys(path: str | os.PathLike, what: str, need_secret: bool = True) -> tuple[bytes, bytes | None]:
    """(public, secret) from a zmq.auth certificate file; ConfigError when unreadable or keyless."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the {what} key {path}: {exc}") from None
    if need_secret and secret is None:
        raise ConfigError(f"{path} holds no secret key (use the *.key_secret file)")
    return public, secret


class ClientKeys:
    """A CURVE client's keys: the server's public key and this side's key pair."""

    def __init__(self, server_key: str | os.PathLike | None, secret: str | os.PathLike | None):
        if not (server_key and secret):
            raise ConfigError("a CURVE worker needs both the broker's public key and its own secret key")
        self.server_public, _ = load_keys(server_key, "broker's public", need_secret=False)
        self.public, self.secret = load_keys(secret, "worker's")

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of the server."""
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.server_public, self.public, self.secret


class CurveServer:
    """The server side: one key pair, one ZeroMQ authenticator (started on first use) per context.

    Args:
        context: the zmq.Context of the sockets to secure.
        secret: the server's certificate file (NAME.key_secret).
    """

    def __init__(self, context: zmq.Context, secret: str | os.PathLike):
        self.ctx = context
        self.secret_path = secret
        self._auth = None

    def secure(self, sock: zmq.Socket, allow: str | os.PathLike | None, domain: str) -> None:
        """Make `sock` (before bind) a CURVE server admitting the public keys in directory `allow`.

        With `allow` None every client that knows the server key is admitted (with a warning).
        """
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_keys(self.secret_path, "server")
        if allow is not None and not os.path.isdir(allow):
            raise ConfigError(f"{allow} is not a directory of public keys")
        if self._auth is None:
            self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("cloud_server.auth"))
            self._auth.start()
        if allow is None:
            log.warning("CURVE without --allow-clients: every client that knows the server key is admitted")
            self._auth.configure_curve(domain=domain, location=CURVE_ALLOW_ANY)
        else:
            self._auth.configure_curve(domain=domain, location=os.fspath(allow))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def close(self) -> None:
        """Stop the authenticator (after the sockets it guards are closed)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
