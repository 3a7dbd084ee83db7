"""A CURVE-secured deployment: the link is encrypted and only known devices get in.

1. key pairs for the server, a known robot, and a stranger (`edgesplit keys generate` when it is
   installed, else zmq.auth.create_certificates: the same certificate files);
2. a cloud server with its secret key and a folder of allowed client public keys;
3. the known robot's agent (AgentConfig.with_curve) is served by the cloud;
4. the stranger's agent, and an agent without keys, are refused: they answer on the device
   (fallback="local") or, with fallback="error", raise LinkDownError.

    python examples/curve_deployment/secure_deployment.py [--requests 5]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.inputs import find_labels, preprocess_image, top_k
from edge_agent.local_cloud import LocalCloud, demo_bundle

REPO = Path(__file__).resolve().parents[2]


def make_keys(folder: Path) -> None:
    """server, robot and stranger key pairs (name.key public, name.key_secret secret)."""
    for name in ("server", "robot", "stranger"):
        done = subprocess.run([sys.executable, "-m", "edgesplit", "keys", "generate", str(folder), "--name", name],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (folder / f"{name}.key_secret").is_file():
            import zmq.auth

            zmq.auth.create_certificates(str(folder), name)


def main() -> int:
    ap = argparse.ArgumentParser(description="CURVE-secured edge <-> cloud deployment")
    ap.add_argument("--requests", type=int, default=5)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        keys, allowed = tmp / "keys", tmp / "allowed_clients"
        keys.mkdir()
        allowed.mkdir()
        make_keys(keys)
        shutil.copy(keys / "robot.key", allowed / "robot.key")   # only the robot's public key
        print(f"1. keys in {keys}: {', '.join(sorted(p.name for p in keys.iterdir()))}")

        bundle = demo_bundle(tmp / "repo" / "efficientnet_lite0")
        cloud = stack.enter_context(LocalCloud(bundle.path.parent, threads=1, extra_args=[
            "--curve-secret", str(keys / "server.key_secret"), "--allow-clients", str(allowed)]))
        print(f"2. CURVE server at {cloud.address}, allowing {[p.name for p in allowed.iterdir()]}")

        labels = find_labels(None, bundle)
        photo = REPO / "edge_agent" / "demo_data" / "photos" / "coffee.jpg"
        feeds = {bundle.inputs[0].name: preprocess_image(photo)}
        base = AgentConfig(connect_timeout_ms=5000, heartbeat_interval_ms=200, intra_op_threads=1)
        agents = {
            "robot (known key)": base.with_curve(keys / "server.key", keys / "robot.key_secret"),
            "stranger (unknown key)": base.with_curve(keys / "server.key", keys / "stranger.key_secret")
                                          .replace(connect_timeout_ms=1000),
            "no keys (plain TCP)": base.replace(connect_timeout_ms=1000),
        }
        where = {}
        for step, (who, cfg) in enumerate(agents.items(), start=3):
            with EdgeAgent(bundle, [cloud.address], cut=2, config=cfg) as agent:
                results = [agent.infer(feeds) for _ in range(args.requests)]
            label, p = top_k(next(iter(results[-1].outputs.values()))[0], labels, 1)[0]
            where[who] = {r.where for r in results}
            print(f"{step}. {who:24s}: {photo.name} -> {label} {p:.2f}; answered by "
                  f"{', '.join(sorted(where[who]))}")
        ok = (where["robot (known key)"] == {"cloud"} and where["stranger (unknown key)"] == {"local"}
              and where["no keys (plain TCP)"] == {"local"})
        print("the known robot was served; the others were refused and answered on the device" if ok
              else "unexpected: see above")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
