"""`python -m edgesplit` runs the CLI."""

import sys

from edgesplit.cli import main

sys.exit(main())
