"""`edgesplit keys generate DIR`: CURVE key pairs for servers, workers and edge devices (zmq.auth)."""

from __future__ import annotations

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="make CURVE key pairs (server, devices)",
                              description="Write ZeroMQ CURVE certificates: NAME.key (public, give it out) "
                                          "and NAME.key_secret (keep it private).")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    g = sub.add_parser("generate", help="write NAME.key and NAME.key_secret into DIR")
    g.add_argument("dir", metavar="DIR", help="folder for the key files (created if missing)")
    g.add_argument("--name", action="append", default=None,
                   help="key pair name (repeatable; default: server)")
    g.add_argument("--force", action="store_true", help="overwrite existing key files")
    g.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run(args) -> int:
    import os
    from pathlib import Path

    import zmq
    import zmq.auth

    from edgesplit.errors import UserError

    if not zmq.has("curve"):
        raise UserError("this libzmq was built without CURVE support")
    folder = Path(args.dir)
    names = args.name or ["server"]
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad key name {name!r}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc}") from None
    for name in names:
        existing = [folder / f"{name}.key", folder / f"{name}.key_secret"]
        if any(p.exists() for p in existing) and not args.force:
            raise UserError(f"{existing[0]} already exists (use --force to replace it)")
        public, secret = zmq.auth.create_certificates(str(folder), name)
        os.chmod(secret, 0o600)
        print(f"{name}: public {public}, secret {secret}")
    return 0
