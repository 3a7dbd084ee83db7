"""Codec benchmark on EfficientNet-Lite0: bytes, accuracy and speed of every codec at every cut.

For the committed model (edge_agent/demo_data/efficientnet_lite0.onnx), partitioned at every candidate cut, on
natural photos (random crops and flips of edge_agent/demo_data/photos/*.jpg and of the natural images that
scikit-image ships, when it is installed), it measures per cut and codec:

- compression: fp32 bytes / wire bytes (payload + the tensor's msgpack descriptor: the header
  carries scales and zero points too);
- top-1 agreement of the split model (head -> encode -> decode -> tail) with the unsplit model;
- encode and decode time per MiB of fp32 activations, pinned to one core.

It also measures folding int8 quantisation into the segments (QuantizeLinear / DequantizeLinear)
against the numpy codec, and the wire protocol's overhead over a bare 1 MiB ZeroMQ send on loopback.

    .venv/bin/python benchmarks/codecs.py                 # full run: ~15-30 min on 2 cores
    .venv/bin/python benchmarks/codecs.py --samples 64 --quick

Writes benchmarks/results/codecs.md, codecs.json and codecs.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from common import machine
from edgesplit import protocol as P
from edgesplit.codecs import decode, get_codec
from edgesplit.codecs.calibration import calibration_for

MODEL = ROOT / "edge_agent" / "demo_data" / "efficientnet_lite0.onnx"
PHOTOS = ROOT / "edge_agent" / "demo_data" / "photos"
RESULTS = ROOT / "benchmarks" / "results"

# (label, spec, uses the bundle's calibration). Int stages: ":pt" per tensor, ":pc" per channel,
# ":bN" per channel per block of N rows; no option: b8 on every map ([N, F]: groups of 128).
# Ranges come from each message unless "cal" (the bundle's calibration, recorded on other crops).
CODECS = [
    ("raw+zstd", "raw+zstd", False),
    ("raw+lz4", "raw+lz4", False),
    ("fp16", "fp16", False),
    ("fp16+lz4", "fp16+lz4", False),
    ("int8", "int8", False),
    ("int8+lz4", "int8+lz4", False),
    ("int8+zstd", "int8+zstd", False),
    ("int8+zstd cal", "int8+zstd", True),
    ("int8:pt+zstd", "int8:pt+zstd", False),
    ("int8:pc+zstd", "int8:pc+zstd", False),
    ("int8:b8+zstd", "int8:b8+zstd", False),
    ("int8:b4+zstd", "int8:b4+zstd", False),
    ("int8:b16+zstd", "int8:b16+zstd", False),
    ("int8:b32+zstd", "int8:b32+zstd", False),
    ("int8:b64+zstd", "int8:b64+zstd", False),
    ("int8:b128+zstd", "int8:b128+zstd", False),
    ("int8+delta+zstd", "int8+delta+zstd", False),
    ("int8:b4+delta+zstd", "int8:b4+delta+zstd", False),
    ("int8:b2+delta+zstd", "int8:b2+delta+zstd", False),
    ("int8:b1+delta+zstd", "int8:b1+delta+zstd", False),
    ("int8+pred+zstd", "int8+pred+zstd:3:mm7", False),
    ("int8:pt+pred+zstd", "int8:pt+pred+zstd:3:mm7", False),
    ("int8:pc+pred+zstd", "int8:pc+pred+zstd:3:mm7", False),
    ("int8:b8+pred+zstd", "int8:b8+pred+zstd:3:mm7", False),
    ("int6:pt+zstd", "int6:pt+zstd", False),
    ("int6:pt+pred+zstd", "int6:pt+pred+zstd:3:mm7", False),
    ("int5:pt+zstd", "int5:pt+zstd", False),
    ("int5:pt+pred+zstd", "int5:pt+pred+zstd:3:mm7", False),
    ("int4:pt", "int4:pt", False),
    ("int4:pt+zstd", "int4:pt+zstd", False),
    ("int4+zstd", "int4+zstd", False),
]
QUICK = {"raw+zstd", "fp16", "int8", "int8+zstd", "int8:pt+zstd", "int5:pt+zstd", "int4:pt+zstd"}


# -- machine -----------------------------------------------------------------------------------
def pin_one_core():
    """Pin this process (numpy, zstd, ORT threads) to one core; returns a function that unpins."""
    if not hasattr(os, "sched_setaffinity"):
        return lambda: None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    return lambda: os.sched_setaffinity(0, before)


# -- photos ------------------------------------------------------------------------------------


def photo_sources() -> list[tuple[str, "object"]]:
    """(name, PIL RGB image): the committed photos, then scikit-image's natural images if installed."""
    from PIL import Image

    sources = []
    for p in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(p) as im:
            sources.append((p.stem, im.convert("RGB")))
    try:
        from skimage import data
    except ImportError:
        return sources
    for name in ["camera", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "retina", "brick",
                 "grass", "gravel", "moon", "immunohistochemistry"]:
        try:
            arr = getattr(data, name)()
        except Exception:  # an image that would need a download: skip it
            continue
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) / max(arr.max(), 1))).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        sources.append((f"skimage.{name}", Image.fromarray(arr[..., :3]).convert("RGB")))
    return sources


def views(sources, count: int, seed: int) -> np.ndarray:
    """`count` random resized crops (25-100% of the area, aspect 3:4-4:3) with random flips."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, 224, 224), np.float32)
    for i in range(count):
        image = sources[i % len(sources)][1]
        w, h = image.size
        for _ in range(20):
            area = w * h * rng.uniform(0.25, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if cw <= w and ch <= h:
                break
        else:
            cw = ch = min(w, h)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = ((np.asarray(crop, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)
    return out


# -- model -------------------------------------------------------------------------------------
def build_bundle(workdir: Path):
    from edgesplit.graph import candidate_cuts, partition

    cuts = candidate_cuts(str(MODEL))
    return partition(str(MODEL), [list(c.tensors) for c in cuts], workdir / "effnet.bundle")


def run_batched(fn, feeds: dict, batch: int) -> dict:
    n = len(next(iter(feeds.values())))
    parts: dict[str, list] = {}
    for s in range(0, n, batch):
        for k, v in fn({k: v[s:s + batch] for k, v in feeds.items()}).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def descriptor_bytes(name: str, enc) -> int:
    """What the tensor adds to the msgpack header (name, dtype, shape, codec, params, nbytes)."""
    return len(msgpack.packb({"name": name, "dtype": enc.dtype, "shape": list(enc.shape), "codec": enc.codec,
                              "params": enc.params, "nbytes": enc.nbytes}, use_bin_type=True))


# -- measurements ------------------------------------------------------------------------------
def evaluate_cut(bundle, k: int, env: dict, ref_top1: np.ndarray, codecs, cal, threads: int, batch: int):
    """For cut k: every codec's bytes, agreement and timings. `env` holds cut k's tensors for all samples."""
    from edgesplit.runtime import SegmentChain

    names = bundle.cut(k).tensors
    n = len(ref_top1)
    rows = []
    with SegmentChain(bundle, k, bundle.num_segments, runner="ort-cpu", intra_op_threads=threads) as tail:
        # Codecs that decode to the same tensors (zstd and lz4 are lossless; "int8" is "int8:pc" or
        # "int8:b8" depending on the map) share one tail run, keyed by a digest of what they decoded;
        # lossless codecs need none.
        seen_top1: dict[tuple, np.ndarray] = {}
        for label, spec, use_cal in codecs:
            codec = get_codec(spec)
            raw_bytes = wire = 0
            t_enc = t_dec = 0.0
            decoded = {t: np.empty_like(env[t]) for t in names}
            exact = True
            for i in range(n):
                for t in names:
                    x = env[t][i:i + 1]
                    entry = calibration_for(cal, t) if use_cal else None
                    t0 = time.thread_time()
                    enc = codec.encode(x, calibration=entry)
                    t1 = time.thread_time()
                    y = decode(enc)
                    t2 = time.thread_time()
                    t_enc += t1 - t0
                    t_dec += t2 - t1
                    raw_bytes += x.size * 4
                    wire += enc.nbytes + descriptor_bytes(t, enc)
                    decoded[t][i:i + 1] = y
                    exact = exact and not codec.lossy
            if exact:
                key = ("exact",)
            else:
                digest = hashlib.blake2b(digest_size=16)
                for t in names:
                    digest.update(decoded[t].data)
                key = ("decoded", digest.hexdigest())
            top1 = seen_top1.get(key)
            if top1 is None:
                logits = run_batched(tail.run, decoded, batch)
                top1 = seen_top1[key] = next(iter(logits.values())).argmax(axis=1)
            mib = raw_bytes / 2**20
            rows.append({
                "cut": k, "codec": label, "spec": spec, "calibrated": use_cal,
                "ratio": raw_bytes / wire, "agreement": float((top1 == ref_top1).mean()),
                "disagree": int((top1 != ref_top1).sum()),
                "encode_ms_per_mib": 1e3 * t_enc / mib, "decode_ms_per_mib": 1e3 * t_dec / mib,
                "encode_us": 1e6 * t_enc / n, "decode_us": 1e6 * t_dec / n, "bytes_fp32": raw_bytes // n,
                "bytes_wire": wire / n,
            })
    return rows


def time_1mib(env_at_cut: dict, specs, repeats: int = 40) -> list[dict]:
    """Encode + decode of about 1 MiB of real activations, pinned to one core, in thread CPU time
    (time.thread_time: what this thread computed, not the time other processes held the core)."""
    x = next(iter(env_at_cut.values()))
    per = x[0].size * 4
    take = max(1, round(2**20 / per))
    t = np.ascontiguousarray(x[:take])  # [take, C, H, W]: about 1 MiB of real activations
    unpin = pin_one_core()
    out = []
    try:
        for spec in specs:
            codec = get_codec(spec)
            enc_t, dec_t = [], []
            for _ in range(repeats):
                t0 = time.thread_time()
                enc = codec.encode(t)
                t1 = time.thread_time()
                decode(enc)
                t2 = time.thread_time()
                enc_t.append(t1 - t0)
                dec_t.append(t2 - t1)
            scale = 2**20 / t.nbytes
            e, d = statistics.median(enc_t) * 1e3 * scale, statistics.median(dec_t) * 1e3 * scale
            out.append({"spec": spec, "shape": list(t.shape), "mib": t.nbytes / 2**20, "encode_ms": e,
                        "decode_ms": d, "total_ms": e + d, "ratio": t.nbytes / enc.nbytes})
    finally:
        unpin()
    return out


def time_fold(bundle, cal, cuts, repeats: int = 30) -> list[dict]:
    """Per cut, batch 1, one core: numpy int8 quantise/dequantise vs QuantizeLinear/DequantizeLinear
    folded into the last head segment and the first tail segment."""
    import onnx

    from edgesplit.codecs.fold import QSUFFIX, codes_of, encoded_from_codes, fold_dequantize, fold_quantize, int8_params
    from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain

    rows = []
    unpin = pin_one_core()
    tmp = Path(tempfile.mkdtemp(prefix="fold."))
    try:
        for k in cuts:
            names = bundle.cut(k).tensors
            if len(names) != 1:
                continue
            t = names[0]
            entry = calibration_for(cal, t)
            scale, zero, axis = int8_params(entry)
            head_seg, tail_seg = bundle.segments[k - 1], bundle.segments[k]
            onnx.save(fold_quantize(onnx.load(head_seg.path), t, scale, zero, axis), tmp / f"h{k}.onnx")
            onnx.save(fold_dequantize(onnx.load(tail_seg.path), t, scale, zero, axis), tmp / f"t{k}.onnx")
            with SegmentChain(bundle, 0, k - 1, runner="ort-cpu", intra_op_threads=1) as pre:
                feeds = pre.run({bundle.inputs[0].name: _one_input(bundle)})
            codec = get_codec("int8:pt")
            with OnnxRuntimeRunner(head_seg.path, intra_op_threads=1) as h, \
                    OnnxRuntimeRunner(tmp / f"h{k}.onnx", intra_op_threads=1) as hq, \
                    OnnxRuntimeRunner(tail_seg.path, intra_op_threads=1) as tl, \
                    OnnxRuntimeRunner(tmp / f"t{k}.onnx", intra_op_threads=1) as tq:
                hin = {n: feeds[n] for n in head_seg.inputs}
                a, b, c, d = [], [], [], []
                for _ in range(repeats):
                    t0 = time.thread_time()
                    enc = codec.encode(h.infer(hin)[t], calibration=entry)
                    t1 = time.thread_time()
                    encf = encoded_from_codes(hq.infer(hin)[t + QSUFFIX], scale, zero, axis)
                    t2 = time.thread_time()
                    tl.infer({t: decode(enc)})
                    t3 = time.thread_time()
                    tq.infer({t + QSUFFIX: codes_of(encf)})
                    t4 = time.thread_time()
                    a.append(t1 - t0)
                    b.append(t2 - t1)
                    c.append(t3 - t2)
                    d.append(t4 - t3)
            rows.append({"cut": k, "tensor": t, "bytes_fp32": int(np.prod(enc.shape)) * 4,
                         "head_numpy_ms": statistics.median(a) * 1e3, "head_folded_ms": statistics.median(b) * 1e3,
                         "tail_numpy_ms": statistics.median(c) * 1e3, "tail_folded_ms": statistics.median(d) * 1e3})
    finally:
        unpin()
    return rows


def _one_input(bundle):
    return views(photo_sources()[:1], 1, seed=7)


def time_protocol(repeats: int = 300) -> dict:
    """Median one-way time of 1 MiB over loopback TCP: a bare frame vs a protocol message (encode,
    send, receive, decode the header and the raw tensor), interleaved so both see the same load."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = 5000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{port}")
    x = np.random.default_rng(0).standard_normal(2**18).astype(np.float32)  # 1 MiB
    raw = get_codec("raw")
    unpin = pin_one_core()
    bare, proto, codec_only, cpu, bare_cpu, proto_cpu = [], [], [], [], [], []
    try:
        for i in range(repeats + 20):
            b0 = time.thread_time()
            t0 = time.perf_counter()
            dealer.send(memoryview(x), copy=False)
            frames = router.recv_multipart(copy=False)
            memoryview(frames[1])
            t1 = time.perf_counter()
            b1 = time.thread_time()
            P.send(dealer, P.infer(f"r{i}", "b" * 64, 3, {"t": raw.encode(x)}, deadline_ms=100.0, reply_codec="raw"))
            _, msg = P.recv(router, envelope=1)
            y = decode(msg.tensors["t"])
            t2 = time.perf_counter()
            b2 = time.thread_time()
            c0 = time.thread_time()
            frames2 = P.encode(P.infer(f"r{i}", "b" * 64, 3, {"t": raw.encode(x)}, deadline_ms=100.0))
            decode(P.decode(frames2).tensors["t"])
            c1 = time.thread_time()
            t3 = time.perf_counter()
            if i >= 20:  # warm-up
                bare.append(t1 - t0)
                proto.append(t2 - t1)
                codec_only.append(t3 - t2)
                cpu.append(c1 - c0)
                bare_cpu.append(b1 - b0)
                proto_cpu.append(b2 - b1)
            assert y.shape == x.shape
    finally:
        unpin()
        router.close()
        dealer.close()
        ctx.term()
    b, p = statistics.median(bare) * 1e6, statistics.median(proto) * 1e6
    return {"bare_us": b, "protocol_us": p, "overhead_us": p - b,
            "encode_decode_only_us": statistics.median(codec_only) * 1e6,
            "encode_decode_cpu_us": statistics.median(cpu) * 1e6,
            "bare_cpu_us": statistics.median(bare_cpu) * 1e6, "protocol_cpu_us": statistics.median(proto_cpu) * 1e6,
            "overhead_cpu_us": (statistics.median(proto_cpu) - statistics.median(bare_cpu)) * 1e6,
            "repeats": repeats}


# -- report ------------------------------------------------------------------------------------
def write_report(res: dict, out: Path) -> None:
    rows = res["rows"]
    cuts = sorted({r["cut"] for r in rows})
    labels = list(dict.fromkeys(r["codec"] for r in rows))
    by = {(r["cut"], r["codec"]): r for r in rows}
    L = []
    L.append("# Codec benchmark: EfficientNet-Lite0, every candidate cut\n")
    L.append(f"Machine: {res['machine']}; at the end: load average "
             f"{res.get('machine_at_end', '').split('load average ')[-1].split(')')[0]}. The box is shared: "
             "timings are medians, measured side by side in this one run.  ")
    L.append(f"Command: `{res['command']}` ({res['elapsed_s'] / 60:.1f} min).  ")
    L.append(f"Samples: {res['samples']} random crops and flips of {len(res['sources'])} natural photos "
             f"({', '.join(res['sources'])}); calibration on {res['calib_samples']} other crops "
             f"(percentile {res['percentile']}).  ")
    L.append("Ratio = fp32 bytes / (payload + the tensor's msgpack descriptor, which carries the scales). "
             "Agreement = top-1 of head -> encode -> decode -> tail equals top-1 of the unsplit model. "
             "Codec times are per MiB of fp32, encoding one image's tensor at a time (batch 1, what the "
             "edge sends), in thread CPU time; small tensors pay a fixed per-call cost, so their ms/MiB is "
             "higher. The 1 MiB table below is the clean speed measurement.\n")

    L.append("## Summary per codec (over all cuts)\n")
    L.append("| codec | min agreement | worst cut | median ratio | ratio range | encode ms/MiB | decode ms/MiB |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for lab in labels:
        rs = [by[(k, lab)] for k in cuts if (k, lab) in by]
        worst = min(rs, key=lambda r: r["agreement"])
        L.append(f"| {lab} | {100 * worst['agreement']:.2f}% | {worst['cut']} | "
                 f"{statistics.median(r['ratio'] for r in rs):.2f}x | {min(r['ratio'] for r in rs):.2f}-"
                 f"{max(r['ratio'] for r in rs):.2f}x | {statistics.median(r['encode_ms_per_mib'] for r in rs):.2f} | "
                 f"{statistics.median(r['decode_ms_per_mib'] for r in rs):.2f} |")

    L.append("\n## Best codec per cut (highest ratio with >= 99% agreement)\n")
    L.append("| cut | tensor | fp32 bytes | int8 agreement | best codec | ratio | agreement | wire bytes |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in cuts:
        rs = [by[(k, lab)] for lab in labels if (k, lab) in by]
        ok = [r for r in rs if r["agreement"] >= 0.99]
        best = max(ok, key=lambda r: r["ratio"]) if ok else None
        i8 = by.get((k, "int8"))
        tensor = ", ".join(res["cut_tensors"][str(k)])
        L.append(f"| {k} | `{tensor}` | {rs[0]['bytes_fp32']} | "
                 f"{100 * i8['agreement']:.2f}% | " if i8 else f"| {k} | `{tensor}` | {rs[0]['bytes_fp32']} | - | ")
        L[-1] += (f"{best['codec']} | {best['ratio']:.2f}x | {100 * best['agreement']:.2f}% | {best['bytes_wire']:.0f} |"
                  if best else "- | - | - | - |")

    L.append("\n## Every cut and codec: agreement % / ratio\n")
    L.append("| cut | " + " | ".join(labels) + " |")
    L.append("| --- |" + " --- |" * len(labels))
    for k in cuts:
        cells = []
        for lab in labels:
            r = by.get((k, lab))
            cells.append(f"{100 * r['agreement']:.1f} / {r['ratio']:.1f}x" if r else "-")
        L.append(f"| {k} | " + " | ".join(cells) + " |")

    if res.get("confirm"):
        c = res["confirm"]
        L.append(f"\n## Confirmation on {c['samples']} fresh crops (another seed), `{c['command']}` "
                 f"({c['elapsed_s'] / 60:.1f} min)\n")
        L.append("| cut | codec | ratio | agreement | images that differ | wire bytes |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for r in c["rows"]:
            L.append(f"| {r['cut']} | {r['codec']} | {r['ratio']:.2f}x | {100 * r['agreement']:.2f}% | "
                     f"{r['disagree']} of {c['samples']} | {r['bytes_wire']:.0f} |")
    for key in sorted(k for k in res if k.startswith("confirm_seed")):
        c = res[key]
        L.append(f"\n## More fresh crops: {c['samples']} (seed {c['seed']}), `{c['command']}` "
                 f"({c['elapsed_s'] / 60:.1f} min)\n")
        L.append(f"Machine: {c['machine']}. Photos: {', '.join(c.get('sources', ['?']))}.\n")
        L.append("| cut | codec | ratio | agreement | images that differ | wire bytes |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for r in c["rows"]:
            L.append(f"| {r['cut']} | {r['codec']} | {r['ratio']:.2f}x | {100 * r['agreement']:.2f}% | "
                     f"{r['disagree']} of {c['samples']} | {r['bytes_wire']:.0f} |")
    L += pareto_report(res)
    for key in sorted(k for k in res if k.startswith("transform_seed")):
        c = res[key]
        L.append(f"\n## A channel transform calibrated at the cut (PCA on {c['calib']} crops of seed 7), "
                 f"{c['samples']} fresh crops (seed {c['seed']}), `{c['command']}` ({c['elapsed_s'] / 60:.1f} min)\n")
        L.append(f"Machine: {c['machine']}. The codec codes the K strongest components (a [1, K, H, W] map or a "
                 "[1, K] vector); the tail runs on the reconstruction.\n")
        L.append("| cut | map | components kept | codec on them | ratio | agreement | images that differ |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in c["rows"]:
            L.append(f"| {r['cut']} | {r['map']} | {r['keep']} | {r['spec']} | {r['ratio']:.2f}x | "
                     f"{100 * r['agreement']:.2f}% | {r['disagree']} of {c['samples']} |")
    for note in res.get("notes", []):  # what exploration scripts measured beside the benchmark, per round
        L.append(f"\n## {note['title']}\n")
        L.append(note["text"])
    for key, title in [("timing_cuts", "Encode + decode at every cut, one core, thread CPU time"),
                       ("timing_cuts_before", "The same timing on the code before")]:
        if res.get(key):
            L += timing_cuts_table(res[key], title)
    for key in sorted(k for k in res if k.startswith("timing_cuts_runs")):  # one per round of alternating runs
        L += timing_runs_table(res[key])
    if res.get("extras_machine"):
        L.append(f"\nThe sections below were measured later by `{res['extras_command']}` "
                 f"({res['extras_elapsed_s'] / 60:.1f} min) on: {res['extras_machine']}.")
    if res.get("timing_1mib"):
        t = res["timing_1mib"]
        L.append(f"\n## Encode + decode of 1 MiB of real activations (cut {res['timing_cut']}, "
                 f"shape {t[0]['shape']}, scaled to 1 MiB), one core, thread CPU time, median of "
                 f"{res['timing_repeats']}\n")
        if res.get("timing_machine"):
            L.append(f"Measured by `{res['timing_command']}` on: {res['timing_machine']}.\n")
        L.append("| codec | encode ms | decode ms | total ms | ratio |")
        L.append("| --- | --- | --- | --- | --- |")
        for r in t:
            L.append(f"| {r['spec']} | {r['encode_ms']:.2f} | {r['decode_ms']:.2f} | {r['total_ms']:.2f} | {r['ratio']:.2f}x |")

    if res.get("fold"):
        L.append("\n## Folding int8 into the segments (batch 1, one core, thread CPU time, calibrated per-tensor int8)\n")
        L.append("Head: last head segment + numpy quantise vs the same segment ending in QuantizeLinear. "
                 "Tail: numpy dequantise + first tail segment vs the segment starting with DequantizeLinear. "
                 "Medians in ms.\n")
        L.append("| cut | fp32 bytes | head numpy | head folded | tail numpy | tail folded | saved |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in res["fold"]:
            saved = r["head_numpy_ms"] + r["tail_numpy_ms"] - r["head_folded_ms"] - r["tail_folded_ms"]
            L.append(f"| {r['cut']} | {r['bytes_fp32']} | {r['head_numpy_ms']:.3f} | {r['head_folded_ms']:.3f} | "
                     f"{r['tail_numpy_ms']:.3f} | {r['tail_folded_ms']:.3f} | {saved:+.3f} |")

    if res.get("protocol"):
        p = res["protocol"]
        L.append(f"\n## Protocol overhead, 1 MiB raw tensor, loopback TCP, one core (median of {p['repeats']})\n")
        L.append("Bare: one 1 MiB frame DEALER -> ROUTER, received with copy=False. Protocol: `P.infer` with a raw "
                 "tensor, `P.send`, `P.recv` (decode and check the header), `codecs.decode` (a zero-copy view). "
                 "Medians of wall-clock time and of the sending/receiving thread's CPU time (time.thread_time, "
                 "which other processes on the shared box do not inflate; ZeroMQ's I/O thread is not in it, and "
                 "it does the same work in both cases but one small extra frame).\n")
        L.append("| measure | bare ZeroMQ frame | protocol message | overhead | encode+decode without sockets |")
        L.append("| --- | --- | --- | --- | --- |")
        L.append(f"| wall clock | {p['bare_us']:.1f} us | {p['protocol_us']:.1f} us | {p['overhead_us']:+.1f} us | "
                 f"{p['encode_decode_only_us']:.1f} us |")
        if "bare_cpu_us" in p:
            L.append(f"| thread CPU | {p['bare_cpu_us']:.1f} us | {p['protocol_cpu_us']:.1f} us | "
                     f"{p['overhead_cpu_us']:+.1f} us | {p['encode_decode_cpu_us']:.1f} us |")
    L.append("")
    (out / "codecs.md").write_text("\n".join(L))


def timing_cuts_table(t: dict, title: str) -> list[str]:
    """--timing-cuts results as a markdown table."""
    L = [f"\n## {title} ({t.get('code', 'this code')}; `{t['command']}`)\n",
         f"Machine: {t['machine']}. Per MiB of fp32 activations: the cut's tensors of up to {t['images']} crops "
         "stacked to about 1 MiB (throughput), and one image at a time (batch 1, what the agent sends: small "
         f"tensors pay a fixed per-call cost of some tens of microseconds). Minimum / median of {t['repeats']} "
         "runs, in ms per MiB.\n"]
    specs = t["specs"]
    L.append("| cut | map | " + " | ".join(f"{sp} 1 MiB (min / med)" for sp in specs) + " | "
             + " | ".join(f"{sp} batch 1 us (min)" for sp in specs) + " |")
    L.append("| --- | --- |" + " --- |" * (2 * len(specs)))
    for row in t["rows"]:
        cells = [f"{row[sp]['mib_min']:.2f} / {row[sp]['mib_med']:.2f}" for sp in specs]
        cells += [f"{row[sp]['one_us_min']:.0f} ({row[sp]['one_ms_per_mib_min']:.1f} ms/MiB)" for sp in specs]
        L.append(f"| {row['cut']} | {row['map']} | " + " | ".join(cells) + " |")
    return L


def timing_runs_table(t: dict) -> list[str]:
    """Alternating --timing-cuts runs of two versions (codecs.json "timing_cuts_runs"): per cut the
    median over the runs of each run's median, and the fastest run's minimum."""
    now, before = t["now"], t["before"]
    L = [f"\n## `{t['spec']}` at every cut: {len(now)} runs of this code and {len(before)} of the code before, "
         "alternating (ms per MiB, thread CPU time)\n",
         f"Order: {t['order']}. This code: {now[0]['code']}; before: {before[0]['code']}. Load average at each "
         "run (this code's, then the older code's): " + ", ".join(r["machine"].split("load average ")[1].split(",")[0] for r in now + before) + ".\n",
         "| cut | map | now: median of medians (fastest minimum) | before: median of medians (fastest minimum) |",
         "| --- | --- | --- | --- |"]
    for i, row in enumerate(now[0]["rows"]):
        cells = [f"{statistics.median(r['rows'][i]['mib_med'] for r in rs):.2f} "
                 f"({min(r['rows'][i]['mib_min'] for r in rs):.2f})" for rs in (now, before)]
        L.append(f"| {row['cut']} | {row['map']} | " + " | ".join(cells) + " |")
    return L


def confirm_sets(res: dict) -> list[dict]:
    return [res[k] for k in ["confirm"] + sorted(k for k in res if k.startswith("confirm_seed")) if k in res]


# Labels that send the default's codes, by cut (checked bit for bit by tests/test_codecs_blocks.py
# and the benchmark's digests): on a set measured before the default had its own label, the
# Pareto check reads the default's rows from these. At cuts 1-3 `delta` only removes bytes, so
# int8:b8+zstd's bytes there overstate the default's: the check is conservative.
SAME_CODES = {"int8+delta+zstd": [("int8:b8+zstd", range(1, 17)), ("int8+zstd (old default)", range(17, 18))]}


def pareto_report(res: dict, default: str = "int8+delta+zstd", slack: float = 0.05) -> list[str]:
    """Per cut, over every confirmation set together: the default's images that differ and ratio
    against every other int8 codec measured on the same crops; a codec beats the default when it
    differs on no more images and its wire bytes are more than `slack` smaller. Codecs measured on
    only some of the sets are listed apart, compared on those sets."""
    sets = confirm_sets(res)
    if not sets:
        return []
    keys = [{(r["cut"], r["codec"]): r for r in c["rows"]} for c in sets]
    for kk in keys:
        for lab, cuts_ in SAME_CODES.get(default, []):
            for k in cuts_:
                if (k, default) not in kk and (k, lab) in kk:
                    kk[(k, default)] = kk[(k, lab)]
    labels = {lab for kk in keys for (_, lab) in kk}
    cuts = sorted({k for kk in keys for (k, _) in kk})
    n = sum(c["samples"] for c in sets)
    L = [f"\n## Pareto check over all fresh crops ({n}: {' + '.join(str(c['samples']) for c in sets)})\n",
         f"Per cut: the images that differ and the wire bytes (sum over the sets where the default was measured at "
         f"that cut: 'crops') of `{default}` and of every other int8 codec measured on all the same crops; 'beaten by' lists codecs that differ on no "
         f"more images and send more than {100 * slack:.0f}% fewer bytes. The last column applies the same "
         f"test to codecs measured on only some of the sets, on those sets (fewer crops: weaker evidence; "
         f"the default's numbers on the same crops after 'vs').\n",
         "| cut | crops | default: differ / ratio | best other (differ / ratio) | beaten by | on fewer crops, beaten by |",
         "| --- | --- | --- | --- | --- | --- |"]

    def total(k, lab, on):
        rs = [keys[i][(k, lab)] for i in on]
        fp32 = sum(r["bytes_fp32"] * sets[i]["samples"] for r, i in zip(rs, on))
        wire = sum(r["bytes_wire"] * sets[i]["samples"] for r, i in zip(rs, on))
        return sum(r["disagree"] for r in rs), fp32 / wire, wire

    for k in cuts:
        # The sets where the default was measured at this cut (a later set may cover only some cuts).
        everywhere = [i for i, kk in enumerate(keys) if (k, default) in kk]
        if not everywhere:
            continue
        d = total(k, default, everywhere)
        same = {lab for lab, cuts_ in SAME_CODES.get(default, []) if k in cuts_}
        full, part = {}, {}
        for lab in labels:
            if lab == default or lab in same or not lab.startswith("int8") or "cal" in lab:
                continue
            on = [i for i in everywhere if (k, lab) in keys[i]]
            if len(on) == len(everywhere):
                full[lab] = total(k, lab, on)
            elif on:
                part[lab] = (total(k, lab, on), total(k, default, on), sum(sets[i]["samples"] for i in on))
        beaten = sorted((lab for lab, v in full.items() if v[0] <= d[0] and v[2] < (1 - slack) * d[2]),
                        key=lambda lab: full[lab][2])
        beaten_part = sorted((lab for lab, (o, dv, _) in part.items() if o[0] <= dv[0] and o[2] < (1 - slack) * dv[2]),
                             key=lambda lab: part[lab][0][2] / part[lab][1][2])
        best = max(full.items(), key=lambda kv: (-kv[1][0], kv[1][1]), default=None)
        L.append(f"| {k} | {sum(sets[i]['samples'] for i in everywhere)} | {d[0]} / {d[1]:.2f}x | " + (f"{best[0]} ({best[1][0]} / {best[1][1]:.2f}x)" if best else "-")
                 + " | " + (", ".join(f"{lab} ({full[lab][0]} / {full[lab][1]:.2f}x)" for lab in beaten) or "none")
                 + " | " + (", ".join(f"{lab} ({part[lab][0][0]} / {part[lab][0][1]:.2f}x vs {part[lab][1][0]} / "
                                      f"{part[lab][1][1]:.2f}x on {part[lab][2]})" for lab in beaten_part) or "none")
                 + " |")
    return L


def timing_cuts(out: Path, args) -> int:
    """Encode + decode of every cut's real activations, one core, thread CPU time: stacked to about
    1 MiB (throughput) and one image at a time (batch 1)."""
    from edgesplit.runtime import SegmentChain

    res = json.loads((out / "codecs.json").read_text())
    bundle = build_bundle(Path(tempfile.mkdtemp(prefix="codecs-timing.")))
    # Enough crops for 1 MiB of distinct activations at every cut (the 1280-feature vector is 5 kB
    # per image: 205 crops); batch 1 times the first 64.
    images, repeats = args.timing_images, 15
    specs = args.timing_specs.split(",")
    env = {bundle.inputs[0].name: views(photo_sources(), images, seed=1)}
    rows = []
    unpin = pin_one_core()
    try:
        for k in range(1, bundle.num_segments):
            with SegmentChain(bundle, k - 1, k, runner="ort-cpu", intra_op_threads=1) as seg:
                env = run_batched(seg.run, env, 16)
            (t,) = bundle.cut(k).tensors
            a = env[t]
            stack = np.ascontiguousarray(a[:max(1, round(2**20 / a[0].nbytes))])
            row = {"cut": k, "map": "x".join(str(d) for d in a.shape[1:]), "stack": len(stack)}
            for sp in specs:
                codec = get_codec(sp)
                mib = []
                for _ in range(repeats):
                    t0 = time.thread_time()
                    enc = codec.encode(stack)
                    decode(enc)
                    mib.append((time.thread_time() - t0) * 2**20 / stack.nbytes * 1e3)
                one = []
                for _ in range(repeats):
                    for i in range(0, min(images, 64), 4):
                        x = a[i:i + 1]
                        t0 = time.thread_time()
                        decode(codec.encode(x))
                        one.append(time.thread_time() - t0)
                row[sp] = {"mib_min": min(mib), "mib_med": statistics.median(mib), "one_us_min": 1e6 * min(one),
                           "one_us_med": 1e6 * statistics.median(one),
                           "one_ms_per_mib_min": min(one) * 1e3 * 2**20 / a[0].nbytes}
                print(f"cut {k:2d} {row['map']:12s} {sp:18s} 1 MiB {row[sp]['mib_min']:.2f}/{row[sp]['mib_med']:.2f} "
                      f"ms/MiB; batch 1 {row[sp]['one_us_min']:.0f} us", flush=True)
            rows.append(row)
    finally:
        unpin()
    import edgesplit

    res[args.timing_key] = {
        "rows": rows, "specs": specs, "images": images, "repeats": repeats, "machine": machine(),
        "code": args.timing_code or f"edgesplit from {Path(edgesplit.__file__).parent}",
        "command": f"python benchmarks/codecs.py --timing-cuts --timing-specs '{args.timing_specs}' "
                   f"--timing-images {images}" + (f" --timing-key {args.timing_key}" if args.timing_key != "timing_cuts" else "")}
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    return 0


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    cuts = sorted({r["cut"] for r in rows})
    labels = list(dict.fromkeys(r["codec"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), sharex=True)
    colors = plt.get_cmap("tab20").colors
    for i, lab in enumerate(labels):
        rs = sorted((r for r in rows if r["codec"] == lab), key=lambda r: r["cut"])
        ks = [r["cut"] for r in rs]
        style = dict(marker="osd^v<>"[i % 7], ms=4, color=colors[i % 20], ls="-" if i < 10 else "--", label=lab)
        ax1.plot(ks, [r["ratio"] for r in rs], **style)
        ax2.plot(ks, [100 * r["agreement"] for r in rs], **style)
    ax1.set_yscale("log")
    ax1.axhline(8, color="k", lw=0.8, ls="--")
    ax1.set_ylabel("compression vs fp32 (x, log)")
    ax1.set_title(f"EfficientNet-Lite0 codecs per cut ({res['samples']} photo crops)")
    ax2.axhline(99, color="k", lw=0.8, ls="--")
    ax2.axhline(99.5, color="k", lw=0.8, ls=":")
    ax2.set_ylim(max(0, min(100 * r["agreement"] for r in rows) - 1), 100.2)
    ax2.set_ylabel("top-1 agreement with unsplit (%)")
    ax2.set_xlabel("cut index")
    ax2.set_xticks(cuts)
    ax1.legend(fontsize=8, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "codecs.png", dpi=110)


def confirm(out: Path, args) -> int:
    """Re-measure a few (cut, codec) pairs on a fresh, larger set of crops (another seed)."""
    from edgesplit.cli.calibrate_cmd import calibrate
    from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain

    started = time.time()
    res = json.loads((out / "codecs.json").read_text())
    pairs = [(int(c), lab) for c, lab in (p.split(":", 1) for p in args.confirm.split(","))]
    by_label = {c[0]: c for c in CODECS}
    work = Path(tempfile.mkdtemp(prefix="codecs-confirm."))
    bundle = build_bundle(work)
    sources = photo_sources()
    xs = views(sources, args.samples, seed=args.seed)
    in_name = bundle.inputs[0].name
    cal = calibrate(bundle, {in_name: views(sources, res["calib_samples"], seed=2)}, percentile=res["percentile"],
                    batch=16, runner="ort-cpu")
    with OnnxRuntimeRunner(MODEL, intra_op_threads=args.threads) as full:
        ref_top1 = next(iter(run_batched(full.infer, {in_name: xs}, args.batch).values())).argmax(axis=1)
    rows = []
    env = {in_name: xs}
    for k in range(1, max(c for c, _ in pairs) + 1):
        with SegmentChain(bundle, k - 1, k, runner="ort-cpu", intra_op_threads=args.threads) as seg:
            env = run_batched(seg.run, env, args.batch)
        labs = [lab for c, lab in pairs if c == k]
        if labs:
            rows += evaluate_cut(bundle, k, env, ref_top1, [by_label[lab] for lab in labs], cal, args.threads,
                                 args.batch)
            for r in rows[-len(labs):]:
                print(f"cut {k}: {r['codec']} {r['ratio']:.2f}x {100 * r['agreement']:.2f}% "
                      f"({r['disagree']} of {len(xs)})", flush=True)
    # Seed 3 is "confirm"; other seeds (more fresh crops) are kept apart under "confirm_more".
    key = "confirm" if args.seed == 3 else f"confirm_seed{args.seed}"
    old = res.get(key)
    command = f"python benchmarks/codecs.py --confirm '{args.confirm}' --samples {args.samples}" + (
        f" --seed {args.seed}" if args.seed != 3 else "")
    elapsed = time.time() - started
    if old and old["samples"] == len(xs):  # same crops (same seed and count): add to the earlier rows
        new = {(r["cut"], r["codec"]) for r in rows}
        rows = sorted([r for r in old["rows"] if (r["cut"], r["codec"]) not in new] + rows,
                      key=lambda r: (r["cut"], r["codec"]))
        command = old["command"] + "; " + command
        elapsed += old["elapsed_s"]
    res[key] = {"rows": rows, "samples": len(xs), "seed": args.seed, "machine": machine(), "command": command,
                "elapsed_s": elapsed, "sources": [s[0] for s in sources]}
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    return 0


def timing_only(out: Path, args) -> int:
    """Redo only the 1 MiB encode + decode timing (keeps every other result in OUT/codecs.json)."""
    from edgesplit.runtime import SegmentChain

    res = json.loads((out / "codecs.json").read_text())
    bundle = build_bundle(Path(tempfile.mkdtemp(prefix="codecs-timing.")))
    with SegmentChain(bundle, 0, 1, runner="ort-cpu") as seg:
        timing_env = seg.run({bundle.inputs[0].name: views(photo_sources(), 8, seed=1)})
    res["timing_1mib"] = time_1mib(timing_env, EXTRA_SPECS)
    res["timing_cut"], res["timing_repeats"] = 1, 40
    res["timing_machine"] = machine()
    res["timing_command"] = "python benchmarks/codecs.py --timing-only"
    for r in res["timing_1mib"]:
        print(f"{r['spec']:26s} enc {r['encode_ms']:.2f} dec {r['decode_ms']:.2f} total {r['total_ms']:.2f} ms/MiB "
              f"{r['ratio']:.2f}x", flush=True)
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    return 0


def transform(out: Path, args) -> int:
    """Issue 13's stretch: a channel transform calibrated at the cut (PCA over each pixel's channel
    vector, or over the feature vector), keeping the K strongest components, then an existing codec
    on the coefficients; the tail runs on the reconstruction. Calibration: --transform-calib crops
    of seed 7; scored on --samples fresh crops of --seed."""
    from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain

    started = time.time()
    res = json.loads((out / "codecs.json").read_text())
    # CUT:KEEP:SPEC (the spec may hold ':' itself).
    plan = [(int(c), int(k), sp) for c, k, sp in (p.split(":", 2) for p in args.transform.split(","))]
    bundle = build_bundle(Path(tempfile.mkdtemp(prefix="codecs-transform.")))
    sources = photo_sources()
    in_name = bundle.inputs[0].name
    xs = views(sources, args.samples, seed=args.seed)
    with OnnxRuntimeRunner(MODEL, intra_op_threads=args.threads) as full:
        ref_top1 = next(iter(run_batched(full.infer, {in_name: xs}, args.batch).values())).argmax(axis=1)
    env, cal_env, rows = {in_name: xs}, {in_name: views(sources, args.transform_calib, seed=7)}, []

    def vectors(a):  # [N, C, H, W] -> [N * H * W, C]; [N, F] as it is
        return a if a.ndim == 2 else a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])

    for k in range(1, max(c for c, _, _ in plan) + 1):
        with SegmentChain(bundle, k - 1, k, runner="ort-cpu", intra_op_threads=args.threads) as seg:
            env, cal_env = run_batched(seg.run, env, args.batch), run_batched(seg.run, cal_env, args.batch)
        if not any(c == k for c, _, _ in plan):
            continue
        (t,) = bundle.cut(k).tensors
        a, cv = env[t], vectors(cal_env[t]).astype(np.float64)
        mu = cv.mean(axis=0)
        w, basis = np.linalg.eigh(np.cov((cv - mu).T))
        basis = basis[:, np.argsort(w)[::-1]].astype(np.float32)
        mu = mu.astype(np.float32)
        with SegmentChain(bundle, k, bundle.num_segments, runner="ort-cpu", intra_op_threads=args.threads) as tail:
            for _, keep, sp in (p for p in plan if p[0] == k):
                codec, vk = get_codec(sp), basis[:, :keep]
                rec, wire = np.empty_like(a), 0
                for i in range(len(a)):
                    coef = (vectors(a[i:i + 1]) - mu) @ vk
                    if a.ndim == 4:  # coefficients as a [1, K, H, W] map, so the map stages apply
                        coef = coef.reshape(1, a.shape[2], a.shape[3], keep).transpose(0, 3, 1, 2)
                    enc = codec.encode(np.ascontiguousarray(coef))
                    wire += enc.nbytes + descriptor_bytes(t, enc)
                    back = vectors(decode(enc)) @ vk.T + mu
                    rec[i:i + 1] = back if a.ndim == 2 else back.reshape(1, a.shape[2], a.shape[3], -1).transpose(0, 3, 1, 2)
                top1 = next(iter(run_batched(tail.run, {t: rec}, args.batch).values())).argmax(axis=1)
                row = {"cut": k, "map": "x".join(str(d) for d in a.shape[1:]), "keep": keep, "spec": sp,
                       "ratio": a.nbytes / wire, "disagree": int((top1 != ref_top1).sum()),
                       "agreement": float((top1 == ref_top1).mean())}
                rows.append(row)
                print(f"cut {k} keep {keep} {sp}: {row['ratio']:.2f}x {100 * row['agreement']:.2f}% "
                      f"({row['disagree']} of {len(a)})", flush=True)
    res[f"transform_seed{args.seed}"] = {
        "rows": rows, "samples": len(xs), "seed": args.seed, "calib": args.transform_calib, "machine": machine(),
        "elapsed_s": time.time() - started,
        "command": f"python benchmarks/codecs.py --transform '{args.transform}' --samples {args.samples} --seed {args.seed} "
                   f"--transform-calib {args.transform_calib}"}
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    return 0


def extras_only(out: Path, args) -> int:
    from edgesplit.cli.calibrate_cmd import calibrate
    from edgesplit.runtime import SegmentChain

    started = time.time()
    res = json.loads((out / "codecs.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="codecs-bench."))
    bundle = build_bundle(work)
    sources = photo_sources()
    xc = views(sources, res["calib_samples"], seed=2)
    in_name = bundle.inputs[0].name
    cal = calibrate(bundle, {in_name: xc}, percentile=res["percentile"], batch=16, runner="ort-cpu")
    with SegmentChain(bundle, 0, 1, runner="ort-cpu") as seg:
        timing_env = seg.run({in_name: views(sources, 8, seed=1)})
    cuts = sorted({r["cut"] for r in res["rows"]})
    res["timing_1mib"] = time_1mib(timing_env, EXTRA_SPECS)
    res["timing_cut"], res["timing_repeats"] = 1, 40
    res["fold"] = time_fold(bundle, cal, cuts)
    res["protocol"] = time_protocol()
    res["extras_machine"] = machine()
    res["extras_command"] = "python benchmarks/codecs.py --extras-only"
    res["extras_elapsed_s"] = time.time() - started
    print(json.dumps({"timing_1mib": res["timing_1mib"], "protocol": res["protocol"]}, indent=1))
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    plot(res, out)
    return 0


EXTRA_SPECS = ["int8+delta+zstd", "int8+zstd", "int8:pc+zstd", "int8:b8+zstd", "int8:pt+zstd", "int8+lz4", "int8", "fp16", "fp16+lz4", "raw+zstd", "int4:pt+zstd",
               "int5:pt+zstd", "int6:pt+zstd", "int6:pt+pred+zstd:3:mm7", "int8+pred+zstd:3:mm7"]


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300, help="evaluation crops (default 300)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration crops (default 64)")
    ap.add_argument("--percentile", type=float, default=99.99, help="calibration percentile")
    ap.add_argument("--cuts", default="all", help="comma-separated cut indices (default all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(sorted(QUICK))}")
    ap.add_argument("--codecs", default=None, help="comma-separated labels from CODECS to run")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the tails")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--skip-extras", action="store_true", help="no 1 MiB timing, folding, protocol")
    ap.add_argument("--report-only", action="store_true", help="rewrite codecs.md and codecs.png from codecs.json")
    ap.add_argument("--confirm", default=None, metavar="CUT:LABEL,...",
                    help="re-measure these (cut, codec) pairs on --samples fresh crops; adds to codecs.json/md")
    ap.add_argument("--seed", type=int, default=3, help="crop seed for --confirm (default 3; the main run uses 1)")
    ap.add_argument("--timing-only", action="store_true",
                    help="keep everything in OUT/codecs.json; redo only the 1 MiB encode + decode timing")
    ap.add_argument("--timing-cuts", action="store_true",
                    help="keep everything in OUT/codecs.json; time encode + decode at every cut (1 MiB and batch 1)")
    ap.add_argument("--timing-specs", default="int8+delta+zstd,int8+zstd,int8:pc+zstd,int8:pt+zstd",
                    help="codecs for --timing-cuts")
    ap.add_argument("--timing-images", type=int, default=208,
                    help="crops for --timing-cuts (default 208: 1 MiB of distinct activations at every cut)")
    ap.add_argument("--timing-key", default="timing_cuts",
                    help="where --timing-cuts stores its table in codecs.json (timing_cuts_before: the code before)")
    ap.add_argument("--timing-code", default=None, help="what code --timing-cuts measured, for the report")
    ap.add_argument("--transform", default=None, metavar="CUT:KEEP:SPEC,...",
                    help="channel PCA calibrated at the cut (seed 7), KEEP components, SPEC on them (the stretch)")
    ap.add_argument("--transform-calib", type=int, default=500, help="calibration crops for --transform")
    ap.add_argument("--extras-only", action="store_true",
                    help="keep the codec rows of OUT/codecs.json; redo the 1 MiB timing, folding and protocol")
    args = ap.parse_args(argv)

    from edgesplit.cli.calibrate_cmd import calibrate
    from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.extras_only:
        return extras_only(out, args)
    if args.timing_only:
        return timing_only(out, args)
    if args.timing_cuts:
        return timing_cuts(out, args)
    if args.confirm:
        return confirm(out, args)
    if args.transform:
        return transform(out, args)
    if args.report_only:
        res = json.loads((out / "codecs.json").read_text())
        write_report(res, out)
        plot(res, out)
        return 0
    machine_at_start = machine()
    print(machine_at_start, flush=True)
    codecs = [c for c in CODECS if (not args.quick or c[0] in QUICK)
              and (args.codecs is None or c[0] in args.codecs.split(","))]
    work = Path(tempfile.mkdtemp(prefix="codecs-bench."))
    bundle = build_bundle(work)
    n = bundle.num_segments
    cuts = list(range(1, n)) if args.cuts == "all" else [int(c) for c in args.cuts.split(",")]
    sources = photo_sources()
    xs = views(sources, args.samples, seed=1)
    xc = views(sources, args.calib_samples, seed=2)
    in_name = bundle.inputs[0].name
    print(f"{len(sources)} photos, {len(xs)} eval crops, {len(xc)} calibration crops, {n} segments", flush=True)
    cal = calibrate(bundle, {in_name: xc}, percentile=args.percentile, batch=16, runner="ort-cpu")

    with OnnxRuntimeRunner(MODEL, intra_op_threads=args.threads) as full:
        ref = run_batched(full.infer, {in_name: xs}, args.batch)
    ref_top1 = next(iter(ref.values())).argmax(axis=1)

    rows = []
    env = {in_name: xs}
    timing_env = None
    for k in range(1, max(cuts) + 1):
        with SegmentChain(bundle, k - 1, k, runner="ort-cpu", intra_op_threads=args.threads) as seg:
            env = run_batched(seg.run, env, args.batch)
        if k == 1:
            timing_env = {t: v[:8].copy() for t, v in env.items()}
        if k not in cuts:
            continue
        t0 = time.time()
        rows += evaluate_cut(bundle, k, env, ref_top1, codecs, cal, args.threads, args.batch)
        worst = min((r for r in rows if r["cut"] == k), key=lambda r: r["agreement"])
        print(f"cut {k:2d}: {len(codecs)} codecs in {time.time() - t0:.0f}s; worst {worst['codec']} "
              f"{100 * worst['agreement']:.2f}%", flush=True)
        for r in rows:
            if r["cut"] == k:
                print(f"    {r['codec']:18s} {r['ratio']:6.2f}x  {100 * r['agreement']:6.2f}%  "
                      f"enc {r['encode_ms_per_mib']:.2f} dec {r['decode_ms_per_mib']:.2f} ms/MiB", flush=True)

    res = {"machine": machine_at_start, "machine_at_end": machine(), "command": "python benchmarks/codecs.py " + " ".join(argv or sys.argv[1:]),
           "samples": len(xs), "calib_samples": len(xc), "percentile": args.percentile,
           "sources": [s[0] for s in sources], "rows": rows,
           "cut_tensors": {str(k): list(bundle.cut(k).tensors) for k in cuts}}
    if not args.skip_extras:
        res["timing_1mib"] = time_1mib(timing_env, EXTRA_SPECS)
        res["timing_cut"], res["timing_repeats"] = 1, 40
        res["fold"] = time_fold(bundle, cal, cuts)
        res["protocol"] = time_protocol()
        print(json.dumps({"timing_1mib": res["timing_1mib"], "protocol": res["protocol"]}, indent=1))
    res["elapsed_s"] = time.time() - started
    (out / "codecs.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)
    plot(res, out)
    print(f"wrote {out / 'codecs.md'} and codecs.png in {res['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
