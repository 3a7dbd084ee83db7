"""The `edgesplit` command: a thin dispatcher over sub-commands registered as entry points.

Each sub-command module exposes ``register(subparsers)`` that adds its parser and sets
``func(args) -> int``. Registration imports only argparse-level code; heavy work is imported
inside ``func``. A sub-command whose module cannot be imported still appears in ``--help``
and says what is missing (Polygraphy's MissingTool).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from edgesplit.errors import UserError
from edgesplit.logs import configure as configure_logs

__all__ = ["main", "build_parser"]


def _missing(name: str, exc: BaseException):
    def register(subparsers):
        p = subparsers.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def run(args):
            raise UserError(f"'edgesplit {name}' is unavailable: {exc}")

        p.set_defaults(func=run)

    return register


def _version() -> str:
    from edgesplit import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit",
        description="Split ONNX models between an edge device and a cloud pool.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--version", action="version", version=f"edgesplit {_version()}")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log lines for people (text, default) or one JSON object per line (json); "
                             "also EDGESPLIT_LOG_FORMAT")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="edgesplit.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as exc:  # a broken or missing plugin must not break the others
            register = _missing(ep.name, exc)
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logs(args.verbose, args.log_format)
    except UserError as exc:
        print(f"edgesplit: error: {exc}", file=sys.stderr)
        return 1
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"edgesplit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgesplit inspect M | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
