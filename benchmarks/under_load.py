"""Run a command beside CPU hogs, then stop them: do the tests and services hold on a busy machine?

    python benchmarks/under_load.py [-n N] [--stress-ng] -- COMMAND [ARGS...]
    python benchmarks/under_load.py -- .ci/venv python -m pytest -q tests/test_cloud.py tests/test_agent.py
    python benchmarks/under_load.py -n 4 -- python benchmarks/chaos.py --scenario worker-kills

N busy processes (default: two per core) spin beside COMMAND: `stress-ng --cpu N` when asked
and installed (Debian: apt-get install stress-ng), else plain Python busy loops. The hogs are
stopped on every exit path; the exit status is COMMAND's. The load average before and after is
printed, so a result can say what it ran beside.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

_SPIN = "import os, signal; signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nwhile True: pass"


def start_hogs(n: int, stress_ng: bool = False) -> list[subprocess.Popen]:
    """N CPU-burning processes (stress-ng's cpu stressors, or Python busy loops)."""
    if stress_ng:
        exe = shutil.which("stress-ng")
        if exe is None:
            raise SystemExit("under_load: stress-ng is not installed (apt-get install stress-ng), drop --stress-ng")
        return [subprocess.Popen([exe, "--cpu", str(n), "--quiet"], stdout=subprocess.DEVNULL)]
    return [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for p in hogs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in hogs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2 * (os.cpu_count() or 1), help="CPU hogs (default: two per core)")
    ap.add_argument("--stress-ng", action="store_true", help="use stress-ng --cpu N instead of Python loops")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command (usage: under_load.py [-n N] -- COMMAND [ARGS...])")
    hogs = start_hogs(args.n, args.stress_ng)
    print(f"[under_load] {args.n} CPU hogs running; load before: {loadavg()}", file=sys.stderr, flush=True)
    try:
        rc = subprocess.call(cmd)
    except KeyboardInterrupt:
        rc = 130
    finally:
        stop_hogs(hogs)
    print(f"[under_load] {' '.join(cmd)} exited {rc}; load: {loadavg()}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
