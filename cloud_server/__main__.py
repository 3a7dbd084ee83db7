"""`python -m cloud_server ...` is `edgesplit serve ...` (same parser, same error handling)."""

import sys

from edgesplit.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
