"""Fuzz a real `deploykit serve-local` (loopback only, bounded in requests and time, stops by itself).

Phases, against one server process on 127.0.0.1:
1. fuzz: ``--requests`` generated requests (deterministic, seeded) in classes: valid controls, malformed JSON,
   wrong types, hostile shapes, huge numbers, binary-extension lengths, image payloads; outcomes counted by class
   and status code; every non-200 must be a JSON ``{"error": ...}`` body; no 5xx is the acceptance bar;
2. bombs: rounds of concurrent 13000 x 13000 PNG bombs (a few hundred KB each): codes and the server's peak RSS;
3. drain: clients keep sending while the server gets SIGTERM: every request that was sent must get one answer.
The server's RSS is sampled every 0.2 s throughout. Writes JSON + a PNG of RSS over time.

    python benchmarks/fuzz_serve.py --requests 10000 --out benchmarks/results/fuzz_serve.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _server import free_port, start_serve_local

from deploykit.tune.bench import cpu_model

PATH = "/v2/models/fuzz/infer"
CHW = (3, 16, 16)


# ---- engine ---------------------------------------------------------------------------------------------------
def tiny_engine(out: Path) -> Path:
    """A tiny untrained 4-exit ViT (the fuzz targets the HTTP/parsing path, not the model)."""
    import torch

    from deploykit.export import export_model
    from deploykit.methods import create_backbone, create_method

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", 10, img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)
    pre = {"input_size": list(CHW), "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    export_model(create_method("multiexit", bb, 10), out, labels=[f"c{i}" for i in range(10)], preprocessing=pre,
                 name="fuzz")
    return out


# ---- payloads ---------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(w: int, h: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + _chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    z, row = zlib.compressobj(9), b"\x00" * (side + 1)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + \
        _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def real_image(rng: random.Random, fmt: str, size: int = 24) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(9 if depth < 3 else 6)
    if k == 6:
        return [rand_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k == 7:
        return {rng.choice("abcnd"): rand_json(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [None, True, rng.randint(-10**6, 10**6), rng.uniform(-1e6, 1e6), "x" * rng.randrange(5),
            rng.choice([2**63, -(2**63) - 1, 10**18]), None, None, rng.choice(["FP32", "BYTES", "", "image"])][k]


def fp32_req(rng: random.Random, n: int = 1) -> dict:
    data = [round(rng.uniform(-2, 2), 3) for _ in range(n * 768)]
    return {"inputs": [{"name": "image", "shape": [n, *CHW], "datatype": "FP32", "data": data}]}


def bytes_req(files: list[bytes]) -> dict:
    return {"inputs": [{"name": "image_bytes", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}]}


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def gen_valid(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    if rng.random() < 0.5:
        return _j(fp32_req(rng, rng.randint(1, 3))), {}
    return _j(bytes_req([img["png"] if rng.random() < 0.5 else img["jpeg"]])), {}


def gen_malformed_json(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    base = _j(fp32_req(rng))
    k = rng.randrange(7)
    if k == 0:
        return base[: rng.randrange(len(base))], {}
    if k == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), {}
    if k == 2:
        d = rng.choice([40, 500, 5000, 50000])
        return (rng.choice(["[", "{\"a\":"]) * d).encode() + b"1" + b"]" * d, {}
    if k == 3:
        return "".join(rng.choice('[]{}",:0123456789.-eE truenl\\') for _ in range(rng.randrange(1, 200))).encode(), {}
    if k == 4:
        return base.replace(b'"FP32"', b'"FP32\xff\xfe"'), {}  # invalid UTF-8
    if k == 5:
        return b"", {}
    return base + b"}" * rng.randrange(1, 5), {}


def gen_types(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    req = fp32_req(rng)
    where = rng.choice(["root", "inputs", "input", "name", "shape", "datatype", "data", "parameters", "outputs",
                        "id", "tensor_params", "data_item"])
    v = rand_json(rng)
    if where == "root":
        return _j(v), {}
    if where == "inputs":
        req["inputs"] = v
    elif where == "input":
        req["inputs"] = [v]
    elif where == "data_item":
        req["inputs"][0]["data"][rng.randrange(768)] = v
    elif where == "tensor_params":
        req["inputs"][0]["parameters"] = v
    elif where in ("parameters", "outputs", "id"):
        req[where] = v
    else:
        req["inputs"][0][where] = v
    return _j(req), {}


def gen_shapes(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    req = fp32_req(rng)
    bad = rng.choice([[True, 3, 16, 16], [-1, 3, 16, 16], [1.0, 3, 16, 16], [2**31, 3, 16, 16], [2**62, 3, 16, 16],
                      [10**19, 3, 16, 16], [1, 3, 16], [], [1] * 40, [0, 3, 16, 16], [2, 3, 16, 16], [1, 16, 16, 3],
                      [3, 16, 16], ["1", 3, 16, 16], [None], [[1], 3, 16, 16], [2**31 - 1, 2**31 - 1]])
    req["inputs"][0]["shape"] = bad
    if rng.random() < 0.3:
        req["inputs"][0]["datatype"] = "BYTES"
    return _j(req), {}


def gen_numbers(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    body = _j(fp32_req(rng)).decode()
    k = rng.randrange(6)
    digits = "9" * rng.choice([21, 100, 400, 5000])
    if k == 0:
        body = body.replace("[1, 3, 16, 16]", f"[{digits}, 3, 16, 16]", 1)
    elif k == 1:
        body = body[:-1] + f', "parameters": {{"exit_threshold": {digits}}}}}'
    elif k == 2:
        body = body.replace('"data": [', f'"data": [{digits}, ', 1)
    elif k == 3:
        body = body.replace('"data": [', f'"data": [{rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])}, ', 1)
    elif k == 4:
        t = rng.choice(["NaN", "-1", "2", "1e400", '"0.5"', "true", "[0.5]"])
        body = body[:-1] + f', "parameters": {{"exit_thresholds": [{t}, null, null, null]}}}}'
    else:
        body = body[:-1] + f', "parameters": {{"exit_threshold": {rng.choice(["NaN", "1e999", "-0.0", "true"])}}}}}'
    return body.encode(), {}


def gen_binary(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    k = rng.randrange(6)
    raw = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((1, *CHW)).astype("<f4").tobytes()
    if k <= 2:  # FP32 binary with wrong sizes
        size = rng.choice([len(raw), len(raw) - 1, len(raw) + 4, 0, -1, True, 2**40, "768"])
        cut = raw[: rng.randrange(len(raw) + 1)] if k == 1 else raw
        header = _j({"inputs": [{"name": "image", "shape": [1, *CHW], "datatype": "FP32",
                                 "parameters": {"binary_data_size": size}}]})
        hlen = rng.choice([len(header), len(header) + 3, len(header) - 2, -5, 10**9, "abc", ""])
        return header + cut, {"inference-header-content-length": str(hlen)}
    items = [img["png"], b"junk"]
    blob = b"".join(struct.pack("<I", len(x)) + x for x in items)
    k2 = rng.randrange(5)
    if k2 == 0:
        blob = blob[: rng.randrange(1, len(blob))]  # truncated element
    elif k2 == 1:
        blob = struct.pack("<I", 0xFFFFFFFF) + blob  # length past the end
    elif k2 == 2:
        blob = blob + b"\x01\x02"  # partial length prefix
    header = _j({"inputs": [{"name": "image_bytes", "shape": [rng.choice([1, 2, 3])], "datatype": "BYTES",
                             "parameters": {"binary_data_size": len(blob)}}]})
    return header + blob, {"inference-header-content-length": str(len(header))}


def gen_images(rng: random.Random, img: dict) -> tuple[bytes, dict]:
    k = rng.randrange(8)
    files = {0: lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))),
             1: lambda: img["png"][: rng.randrange(8, len(img["png"]))],
             2: lambda: png_header(rng.choice([20000, 65535, 100000]), rng.choice([20000, 65535, 100000])),
             3: lambda: b"GIF89a" + bytes(rng.randrange(256) for _ in range(50)),
             4: lambda: img["jpeg"][: rng.randrange(4, len(img["jpeg"]))],
             5: lambda: img["bomb_small"],
             6: lambda: img["png"],
             7: lambda: b"BM" + struct.pack("<IHHI", 60, 0, 0, 54) + bytes(40)}[k]
    req = bytes_req([files() for _ in range(rng.randint(1, 2))])
    if rng.random() < 0.1:
        req["inputs"][0]["data"] = ["!!not base64!!", 5, None][rng.randrange(3)]
    return _j(req), {}


CLASSES = {"valid": (gen_valid, 1), "malformed_json": (gen_malformed_json, 2), "types": (gen_types, 2),
           "shapes": (gen_shapes, 2), "numbers": (gen_numbers, 2), "binary_lengths": (gen_binary, 2),
           "images": (gen_images, 2)}


# ---- client -------------------------------------------------------------------------------------------------------
def send(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
    conn.request("POST", PATH, body, {"content-type": "application/json", **headers})
    r = conn.getresponse()
    data = r.read()
    return r.status, data, r.getheader("content-type", "")


def fuzz_phase(port: int, n: int, clients: int, seed: int, img: dict) -> dict:
    names = list(CLASSES)
    weights = [CLASSES[c][1] for c in names]
    plan_rng = random.Random(seed)
    plan = [(plan_rng.choices(names, weights)[0], plan_rng.randrange(1 << 30)) for _ in range(n)]
    outcomes: dict[str, Counter] = defaultdict(Counter)
    bad_bodies: list[str] = []
    lock = threading.Lock()
    idx = iter(range(n))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(idx, None)
            if i is None:
                break
            cls, s = plan[i]
            body, headers = CLASSES[cls][0](random.Random(s), img)
            try:
                code, data, ctype = send(conn, body, headers)
                ok_body = code == 200 or (ctype.startswith("application/json") and "error" in json.loads(data))
            except (OSError, http.client.HTTPException, ValueError) as e:
                code, ok_body = f"conn:{type(e).__name__}", True
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                outcomes[cls][str(code)] += 1
                if not ok_body:
                    bad_bodies.append(f"{cls} {code} {data[:120]!r}")
        conn.close()

    t0 = time.time()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = Counter()
    for c in outcomes.values():
        total.update(c)
    return {"requests": n, "clients": clients, "seconds": round(time.time() - t0, 2),
            "by_class": {k: dict(sorted(v.items())) for k, v in sorted(outcomes.items())},
            "by_code": dict(sorted(total.items())),
            "five_xx": sum(v for k, v in total.items() if k.startswith("5")),
            "connection_errors": sum(v for k, v in total.items() if k.startswith("conn")),
            "non_json_errors": len(bad_bodies), "non_json_examples": bad_bodies[:5]}


def bomb_phase(port: int, pid: int, bomb: bytes, rounds: int, concurrent: int) -> dict:
    body = _j(bytes_req([bomb]))
    hwm_before = proc_kb(pid, "VmHWM")
    codes: Counter = Counter()
    t0 = time.time()
    def one(res: list[int]) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            res.append(send(c, body, {})[0])
        finally:
            c.close()

    for _ in range(rounds):
        res: list[int] = []
        threads = [threading.Thread(target=one, args=(res,)) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes.update(str(c) for c in res)
    return {"bomb_bytes": len(bomb), "bomb_pixels": 13000 * 13000, "rounds": rounds, "concurrent": concurrent,
            "codes": dict(codes), "seconds": round(time.time() - t0, 2),
            "peak_rss_mb_before": round(hwm_before / 1024, 1),
            "peak_rss_mb_after": round(proc_kb(pid, "VmHWM") / 1024, 1)}


def drain_phase(proc: Any, port: int, clients: int, load_s: float) -> dict:
    body = _j(fp32_req(random.Random(0), 2))
    stop, lock, outcomes = threading.Event(), threading.Lock(), Counter()

    def worker() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.connect()
            except OSError:
                with lock:
                    outcomes["refused_before_send"] += 1
                time.sleep(0.01)
                continue
            try:
                key = str(send(conn, body, {})[0])
            except (OSError, http.client.HTTPException) as e:
                key = f"dropped_after_send:{type(e).__name__}"
            finally:
                conn.close()
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(load_s)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    took = time.time() - t0
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    return {"clients": clients, "exit_code": code, "drain_seconds": round(took, 2), "outcomes": dict(outcomes),
            "dropped_after_send": sum(v for k, v in outcomes.items() if k.startswith("dropped"))}


# ---- RSS --------------------------------------------------------------------------------------------------------
def proc_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples, self.marks = pid, every_s, [], []
        self.t0, self.stop = time.time(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            kb = proc_kb(self.pid, "VmRSS")
            if kb:
                self.samples.append((round(time.time() - self.t0, 2), round(kb / 1024, 1)))
            time.sleep(self.every_s)

    def mark(self, name: str) -> None:
        self.marks.append((name, round(time.time() - self.t0, 2)))


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*result["rss_mb"]) if result["rss_mb"] else ((), ())
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, rss, lw=1)
    for name, at in result["phases"]:
        ax.axvline(at, color="grey", ls=":", lw=1)
        ax.text(at, max(rss or [0]) * 1.01, name, fontsize=8, rotation=90, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"serve-local under fuzzing: {result['fuzz']['requests']} requests, "
                 f"{result['fuzz']['five_xx']} 5xx")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", help="engine to serve (default: a tiny untrained 4-exit ViT exported here)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bomb-rounds", type=int, default=5)
    p.add_argument("--bomb-concurrent", type=int, default=3)
    p.add_argument("--drain-clients", type=int, default=32)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--server-args", default="--drain-timeout 20",
                   help="extra serve-local options (give '' to fuzz a deploykit without --drain-timeout)")
    p.add_argument("--out", default="benchmarks/results/fuzz_serve.json")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fuzz-serve-"))
    engine = Path(args.engine_dir) if args.engine_dir else tiny_engine(tmp / "fuzz")
    img_rng = random.Random(args.seed)
    img = {"png": real_image(img_rng, "PNG"), "jpeg": real_image(img_rng, "JPEG"), "bomb_small": png_bomb(5000)}
    bomb = png_bomb(13000)
    global PATH
    PATH = f"/v2/models/{json.loads((engine / 'deploykit.json').read_text())['name']}/infer"
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    opts = ["--instances", str(args.instances), "--threads", "1", "--max-queue", "512", *args.server_args.split()]
    proc = start_serve_local(str(engine), port, opts)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        idle = proc_kb(proc.pid, "VmRSS") / 1024
        sampler.mark("fuzz")
        fuzz = fuzz_phase(port, args.requests, args.clients, args.seed, img)
        alive = proc.poll() is None
        rss_after_fuzz = proc_kb(proc.pid, "VmRSS") / 1024
        sampler.mark("bombs")
        bombs = bomb_phase(port, proc.pid, bomb, args.bomb_rounds, args.bomb_concurrent)
        sampler.mark("SIGTERM load")
        drain = drain_phase(proc, port, args.drain_clients, load_s=3.0)
    finally:
        sampler.stop.set()
        if proc.poll() is None:
            proc.kill()
    rss = [r for _, r in sampler.samples]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_model(),
        "loadavg": os.getloadavg(), "engine": str(engine), "server_alive_after_fuzz": alive,
        "idle_rss_mb": round(idle, 1), "rss_after_fuzz_mb": round(rss_after_fuzz, 1),
        "peak_rss_mb": max(rss) if rss else None, "fuzz": fuzz, "bombs": bombs, "drain": drain,
        "rss_mb": sampler.samples, "phases": sampler.marks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mb",)}, indent=1))


if __name__ == "__main__":
    main()
