"""`python -m cloud_server ...` is `edgesplit serve ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from edgesplit.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from cloud_server.cli import build_serve_parser

    parser = build_serve_parser(argparse.ArgumentParser(
        prog="python -m cloud_server", description="The edgesplit cloud pool (same as `edgesplit serve`)."))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"python -m cloud_server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
