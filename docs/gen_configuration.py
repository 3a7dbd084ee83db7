"""Writes the settings tables of docs/configuration.md from the config dataclasses themselves.

    python docs/gen_configuration.py           rewrite the tables in place
    python docs/gen_configuration.py --check   exit 1 when the page is out of date (tests/test_settings.py)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cloud_server.config import ServerConfig
from edge_agent.config import AgentConfig
from edgesplit import settings

PAGE = Path(__file__).with_name("configuration.md")
TABLES = {"server": ServerConfig, "agent": AgentConfig}


def render(text: str) -> str:
    """`text` with every generated table replaced by the current one."""
    for section, cls in TABLES.items():
        begin, end = f"<!-- generated: {section} -->", f"<!-- end generated: {section} -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{PAGE}: no {begin} ... {end} block")
        table = settings.markdown_table(cls, section)
        text = pattern.sub(lambda _: f"{begin}\n{table}{end}", text)
    return text


def main(argv: list[str]) -> int:
    old = PAGE.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print(f"{PAGE} is out of date: run python docs/gen_configuration.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
