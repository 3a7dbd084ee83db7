"""The bundle repository: a directory of bundle directories (or one bundle), known by bundle id."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgesplit.bundle import Bundle
from edgesplit.errors import BundleError, ConfigError

__all__ = ["Repository", "bundle_summary"]

log = logging.getLogger(__name__)


def bundle_summary(bundle: Bundle) -> dict:
    """What the broker and /v1/models need to know of a bundle (JSON- and msgpack-able)."""
    return {
        "id": bundle.id,
        "name": bundle.name,
        "segments": bundle.num_segments,
        # bytes of each segment's weights on disk: what the broker places stages by (cloud_server.placement)
        "segment_bytes": list(bundle.segment_bytes),
        "stateful": bool(bundle.state),
        "cuts": [{"index": c.index, "tensors": list(c.tensors), "bytes_per_sample": c.bytes_per_sample}
                 for c in (bundle.cut(k) for k in range(bundle.num_segments + 1))],
    }


class Repository:
    """Bundles under `root`: every direct subdirectory with a manifest.json, or `root` itself.

    Args:
        root: the repository directory.
        verify: recompute each bundle's content hash when loading it (workers do; the broker
            only reads manifests).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"repository {self.root} is not a directory")
        self.verify = verify
        self._paths: dict[str, Path] = {}
        self._bundles: dict[str, Bundle] = {}
        self._bad: dict[Path, float] = {}

    def scan(self) -> dict[str, Path]:
        """Look for bundles again (manifests only); returns id -> path. Bad bundles are logged once."""
        found: dict[str, Path] = {}
        bundles: dict[str, Bundle] = {}
        dirs = [self.root] if (self.root / "manifest.json").is_file() else sorted(
            p for p in self.root.iterdir() if p.is_dir() and (p / "manifest.json").is_file())
        for d in dirs:
            try:
                b = Bundle.load(d, verify=False)
            except (BundleError, OSError) as exc:
                try:
                    stamp = (d / "manifest.json").stat().st_mtime
                except OSError:
                    stamp = 0.0
                if self._bad.get(d) != stamp:
                    self._bad[d] = stamp
                    log.warning("repository: skipping %s: %s", d, exc)
                continue
            found[b.id] = d
            bundles[b.id] = b
        self._paths, self._bundles = found, bundles
        return dict(found)

    def ids(self) -> list[str]:
        return sorted(self._paths)

    def __contains__(self, bundle_id: str) -> bool:
        return bundle_id in self._paths

    def manifest(self, bundle_id: str) -> Bundle:
        """The bundle as read at the last scan (content not verified)."""
        return self._bundles[bundle_id]

    def load(self, bundle_id: str) -> Bundle:
        """Load the bundle (verified when `verify`); raises BundleError when it is gone or changed."""
        path = self._paths.get(bundle_id)
        if path is None:
            raise BundleError(f"bundle {bundle_id[:12]} is not in repository {self.root}")
        bundle = Bundle.load(path, verify=self.verify)
        if bundle.id != bundle_id:
            raise BundleError(f"bundle at {path} changed (now {bundle.id[:12]})")
        return bundle
