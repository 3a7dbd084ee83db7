"""Bundles that travel: a worker asked for a bundle it does not hold fetches it from its broker.

Content-addressed by the bundle id: the broker serves only bundles of its own repository, by
id, and the worker keeps a transfer only when the files it got hash to that id
(`edgesplit.bundle.compute_id`, checked by `Bundle.load(verify=True)`, which also refuses
segment paths that leave the bundle). What travels is what the id covers: manifest.json and
every file under segments/, laid end to end and cut into chunks::

    worker -> broker   [ctl("fetch", bundle, -1)]                 the index, please
    broker -> worker   [ctl("bundle", bundle, -1, {"files": [[path, size], ...], "chunk": n})]
                       [ctl("bundle", bundle, -1, {"error": why})]
    worker -> broker   [ctl("fetch", bundle, offset)]             a few chunks in flight
    broker -> worker   [ctl("bundle", bundle, offset, None), data]

The worker refuses an index over `ServerConfig.fetch_max_bytes` or with a path outside
manifest.json and segments/, a chunk at an offset it did not ask for next or of the wrong
length, a transfer that stalls for `fetch_timeout_s`, and files that do not hash to the id. It
writes into a scratch folder under the repository (`.fetching/`, which a repository scan does
not read) and renames the finished bundle to `<repository>/<id>` in one step, so a reader
sees either no bundle or the whole one. Requests that wait for a bundle are parked; they go
back into the queue when it is in (deadlines still apply), or get "unknown_bundle" with the
reason when the fetch failed (which is remembered for `rescan_interval_s`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgesplit.bundle import Bundle, contained_path
from edgesplit.errors import BundleError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.repository import Repository

__all__ = ["BundleSource", "BundleFetcher", "bundle_files", "SCRATCH"]

log = logging.getLogger(__name__)
SCRATCH = ".fetching"
_WINDOW = 4  # chunks in flight per transfer
_MAX_FILES = 10_000


def bundle_files(path: Path) -> list[tuple[str, Path]]:
    """What a bundle's id covers, in transfer order: manifest.json, then every file under segments/."""
    seg = path / "segments"
    files = [("manifest.json", path / "manifest.json")]
    if seg.is_dir():
        files += [(p.relative_to(path).as_posix(), p) for p in sorted(seg.rglob("*")) if p.is_file()]
    return files


class BundleSource:
    """The broker's side: answers a worker's "fetch" from the broker's own repository."""

    def __init__(self, repository: Repository | None, config: ServerConfig):
        self.repository = repository
        self.chunk = config.fetch_chunk_bytes
        self._index: dict[str, list[tuple[str, Path, int]]] = {}

    def _files(self, bundle: str) -> list[tuple[str, Path, int]] | None:
        files = self._index.get(bundle)
        if files is None and self.repository is not None:
            if bundle not in self.repository:
                self.repository.scan()
            if bundle in self.repository:
                path = self.repository.manifest(bundle).path
                files = [(rel, p, p.stat().st_size) for rel, p in bundle_files(path)]
                self._index[bundle] = files
        return files

    def answer(self, c: list) -> list | None:
        """The reply to [FETCH, bundle, offset], or None when the message is malformed."""
        if len(c) < 3 or not isinstance(c[1], str) or type(c[2]) is not int:
            return None
        bundle, offset = c[1][:128], c[2]
        try:
            files = self._files(bundle)
        except OSError as exc:
            return [W.ctl(W.BUNDLE, bundle, -1, {"error": f"cannot read bundle {bundle[:12]}: {exc}"})]
        if files is None:
            return [W.ctl(W.BUNDLE, bundle, -1, {"error": f"bundle {bundle[:12]} is not in the broker's repository"})]
        if offset == -1:
            return [W.ctl(W.BUNDLE, bundle, -1, {"files": [[rel, size] for rel, _, size in files],
                                                 "chunk": self.chunk})]
        try:
            return [W.ctl(W.BUNDLE, bundle, offset, None), self._read(files, offset)]
        except (OSError, ValueError) as exc:
            self._index.pop(bundle, None)  # changed on disk: read again next time
            return [W.ctl(W.BUNDLE, bundle, -1, {"error": f"cannot read bundle {bundle[:12]}: {exc}"})]

    def _read(self, files: list[tuple[str, Path, int]], offset: int) -> bytes:
        total = sum(size for _, _, size in files)
        if not 0 <= offset < total:
            raise ValueError(f"offset {offset} outside the bundle's {total} bytes")
        want = min(self.chunk, total - offset)
        out = bytearray()
        start = 0
        for _, p, size in files:
            if offset < start + size and len(out) < want:
                with open(p, "rb") as fh:
                    fh.seek(offset + len(out) - start)
                    out += fh.read(min(want - len(out), start + size - (offset + len(out))))
            start += size
        if len(out) != want:
            raise ValueError("a file got shorter")
        return bytes(out)


class _Transfer:
    def __init__(self, bundle: str, folder: Path, send: Callable[[list], None], now: float):
        self.bundle = bundle
        self.folder = folder
        self.send = send
        self.files: list[tuple[str, int]] | None = None
        self.total = 0
        self.chunk = 0
        self.received = 0  # bytes written so far (chunks arrive in the order asked)
        self.asked = 0  # the next offset to ask for
        self.last = now
        self.started = now
        self._fh = None
        self._file = 0  # index of the file being written
        self._left = 0  # bytes still to write into it

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class BundleFetcher:
    """The worker's side: parks requests for a missing bundle, fetches it, puts them back.

    Args:
        repository: the worker's repository (the bundle lands in <root>/<id>).
        config: fetch_max_bytes / fetch_chunk_bytes / fetch_timeout_s / rescan_interval_s.
        name: the worker's name, for logs.
        done: called with (bundle, jobs, error or None) when a fetch ends.
    """

    def __init__(self, repository: Repository, config: ServerConfig, name: str,
                 done: Callable[[str, list, str | None], None]):
        self.repository = repository
        self.config = config
        self.name = name
        self._done = done
        self.active: dict[str, _Transfer] = {}
        self.parked: dict[str, list] = {}
        self.failed: dict[str, tuple[float, str]] = {}
        self.fetched = 0  # bundles fetched so far (the status reports it)

    @property
    def enabled(self) -> bool:
        return self.config.fetch_max_bytes > 0

    def want(self, bundle: str, job, send: Callable[[list], None]) -> bool:
        """Park `job` until `bundle` is fetched (starting the fetch through `send`); False: cannot fetch it."""
        if not self.enabled or (self.repository.root / "manifest.json").is_file() or not isinstance(bundle, str) or len(bundle) != 64 \
                or any(ch not in "0123456789abcdef" for ch in bundle):
            return False
        failed = self.failed.get(bundle)
        if failed is not None and time.monotonic() - failed[0] < self.config.rescan_interval_s:
            return False
        self.parked.setdefault(bundle, []).append(job)
        if bundle not in self.active:
            now = time.monotonic()
            folder = self.repository.root / SCRATCH / f"{bundle}-{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            self.active[bundle] = _Transfer(bundle, folder, send, now)
            log.info("%s: fetching bundle %s from the broker", self.name, bundle[:12])
            send([W.ctl(W.FETCH, bundle, -1)])
        return True

    def why_failed(self, bundle: str) -> str | None:
        f = self.failed.get(bundle)
        return f[1] if f else None

    def on_message(self, c: list, frames: list) -> None:
        """A [BUNDLE, bundle, offset, info] message from the broker (data in frames[0] for a chunk)."""
        if len(c) < 4 or not isinstance(c[1], str):
            return
        t = self.active.get(c[1])
        if t is None:
            return  # not asked for (or already given up)
        try:
            if c[2] == -1:
                self._on_index(t, c[3])
            else:
                self._on_chunk(t, c[2], frames[0] if frames else None)
        except (BundleError, OSError) as exc:
            self._finish(t, str(exc))
            return
        t.last = time.monotonic()
        if t.files is not None and t.received == t.total:
            self._finish(t, self._install(t))
        else:
            self._ask(t)

    def expire(self, now: float) -> None:
        """Fail transfers that got nothing for fetch_timeout_s."""
        for t in list(self.active.values()):
            if now - t.last > self.config.fetch_timeout_s:
                self._finish(t, f"no data from the broker for {self.config.fetch_timeout_s:.0f} s "
                                f"({t.received} of {t.total or '?'} bytes)")

    # -- the transfer ---------------------------------------------------------------------------
    def _on_index(self, t: _Transfer, info) -> None:
        if t.files is not None or not isinstance(info, dict):
            raise BundleError("unexpected index")
        if "error" in info:
            raise BundleError(f"the broker cannot send it: {str(info['error'])[:300]}")
        files, chunk = info.get("files"), info.get("chunk")
        if not isinstance(files, list) or not 0 < len(files) <= _MAX_FILES or type(chunk) is not int or chunk <= 0:
            raise BundleError("malformed bundle index")
        if chunk > self.config.limits.max_message_bytes // 2:
            raise BundleError(f"chunks of {chunk} bytes are over this worker's bound")
        seen, out = set(), []
        for e in files:
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 0):
                raise BundleError("malformed bundle index entry")
            rel, size = e
            if not (rel == "manifest.json" or rel.startswith("segments/")) or rel in seen:
                raise BundleError(f"bundle file {rel[:100]!r} is not manifest.json or under segments/")
            seen.add(rel)
            out.append((rel, size))
        if out[0][0] != "manifest.json":
            raise BundleError("the index does not start with manifest.json")
        total = sum(size for _, size in out)
        if total > self.config.fetch_max_bytes:
            raise BundleError(f"bundle of {total} bytes is over ServerConfig.fetch_max_bytes "
                              f"({self.config.fetch_max_bytes})")
        t.folder.mkdir(parents=True)
        for rel, _ in out:  # every path checked (and its folder made) before a byte is written
            dest = contained_path(t.folder, rel, "bundle file")
            dest.parent.mkdir(parents=True, exist_ok=True)
        t.files, t.total, t.chunk = out, total, chunk

    def _on_chunk(self, t: _Transfer, offset, data) -> None:
        if t.files is None or offset != t.received or data is None:
            raise BundleError(f"chunk at offset {offset!r} out of order (expected {t.received})")
        view = memoryview(data)
        if view.nbytes != min(t.chunk, t.total - offset):
            raise BundleError(f"truncated chunk at offset {offset}: {view.nbytes} bytes")
        while view.nbytes:
            if t._fh is None or t._left == 0:
                if t._fh is not None:
                    t._fh.close()
                    t._file += 1
                while t.files[t._file][1] == 0:  # empty files: made, nothing to write
                    (t.folder / t.files[t._file][0]).touch()
                    t._file += 1
                t._fh = open(t.folder / t.files[t._file][0], "wb")
                t._left = t.files[t._file][1]
            n = min(t._left, view.nbytes)
            t._fh.write(view[:n])
            t._left -= n
            view = view[n:]
            t.received += n

    def _ask(self, t: _Transfer) -> None:
        if t.files is None:
            return
        while t.asked < t.total and t.asked < t.received + _WINDOW * t.chunk:
            t.send([W.ctl(W.FETCH, t.bundle, t.asked)])
            t.asked += t.chunk

    def _install(self, t: _Transfer) -> str | None:
        """Check the files against the id and move them into the repository; None, or why not."""
        t.close()
        for rel, size in t.files:
            if size == 0:
                (t.folder / rel).touch()
        try:
            bundle = Bundle.load(t.folder, verify=True)  # the content hash, and every path inside
        except BundleError as exc:
            return f"refused: {exc}"
        if bundle.id != t.bundle:
            return f"refused: the files are bundle {bundle.id[:12]}, not {t.bundle[:12]}"
        dest = self.repository.root / t.bundle
        try:
            os.rename(t.folder, dest)  # atomic: a scan sees the whole bundle or none of it
        except OSError as exc:
            if not (dest / "manifest.json").is_file():
                return f"cannot install it: {exc}"
        return None

    def _finish(self, t: _Transfer, error: str | None) -> None:
        t.close()
        self.active.pop(t.bundle, None)
        shutil.rmtree(t.folder, ignore_errors=True)
        jobs = self.parked.pop(t.bundle, [])
        if error is None:
            self.fetched += 1
            self.failed.pop(t.bundle, None)
            log.info("%s: fetched bundle %s (%d bytes in %.2f s)", self.name, t.bundle[:12], t.total,
                     time.monotonic() - t.started)
        else:
            self.failed[t.bundle] = (time.monotonic(), error[:500])
            log.error("%s: could not fetch bundle %s: %s", self.name, t.bundle[:12], error)
        self._done(t.bundle, jobs, error)
