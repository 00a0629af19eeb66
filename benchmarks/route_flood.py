"""How a flood of P2P alignment requests affects a running ComfyUI server: /system_stats latency while it lasts.

    python benchmarks/route_flood.py http://127.0.0.1:8188                       # 1000 requests, 50 at a time
    python benchmarks/route_flood.py http://127.0.0.1:8188 --requests 200 --concurrency 20 --tokenizer sdxl

Starts nothing: it takes the URL of a ComfyUI server with the pack installed (on this machine only: 127.0.0.1,
localhost or ::1). It times --samples sequential GETs of /system_stats, then sends --requests alignment requests
(each with prompts of its own) from --concurrency threads while a sampler thread times /system_stats every
--interval seconds, and prints the median and 95th percentile of /system_stats before and during the flood, the
alignment requests' status counts and latencies, and the flood's throughput. With --refused every body is one the
route refuses before tokenizing (400): the same HTTP load without the tokenizers' work, to compare with. Bounded:
the flood stops submitting after --max-seconds. Figures go to a JSON file with --json.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROUTE = "/direct_inversion/p2p_alignment"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SUBJECTS = ("cat", "dog", "tiger", "fluffy red fox", "small bird", "horse")


def _timed(request: urllib.request.Request | str, timeout: float) -> tuple[float, object]:
    """Seconds the request took and its HTTP status (or the exception's name)."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    except OSError as e:
        status = type(e).__name__
    return time.perf_counter() - start, status


def _alignment_request(url: str, i: int, tokenizer: str, refused: bool = False) -> urllib.request.Request:
    """Prompts of the request's own; or (``refused``) a body the route refuses before tokenizing anything."""
    source = f"a {SUBJECTS[i % len(SUBJECTS)]} sitting on a bench number {i}"
    target = f"a {SUBJECTS[(i + 1) % len(SUBJECTS)]} sitting on a wooden bench number {i}"
    body = json.dumps({"source": source, "target": target, "tokenizer": tokenizer}).encode()
    if refused:
        body = body.replace(b'"target"', b'"targt"')  # 400: 'target' must be a string
    return urllib.request.Request(url + ROUTE, data=body, method="POST", headers={"Content-Type": "application/json"})


def _summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "median_ms": None, "p95_ms": None}
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


def flood(url: str, requests: int = 1000, concurrency: int = 50, tokenizer: str = "sd1", samples: int = 50,
          interval: float = 0.02, max_seconds: float = 300.0, timeout: float = 60.0, refused: bool = False) -> dict:
    """The figures of one run (see the module docstring)."""
    stats_url = url + "/system_stats"
    before = []
    for _ in range(samples):
        seconds, status = _timed(stats_url, timeout)
        if status != 200:
            raise SystemExit(f"{stats_url} answered {status}; is ComfyUI running there?")
        before.append(seconds)
        time.sleep(interval)
    _timed(_alignment_request(url, -1, tokenizer), timeout)  # the tokenizer's first load is not part of the flood

    during, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            seconds, status = _timed(stats_url, timeout)
            if status == 200:
                during.append(seconds)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    statuses, latencies = collections.Counter(), []
    deadline = time.monotonic() + max_seconds

    def one(i: int):
        if time.monotonic() > deadline:
            return "not sent", None
        return _timed(_alignment_request(url, i, tokenizer, refused), timeout)[::-1]

    start = time.perf_counter()
    sampler.start()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for status, seconds in pool.map(one, range(requests)):
            statuses[status] += 1
            if seconds is not None and status == 200:
                latencies.append(seconds)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join(timeout + interval)
    return {"url": url, "requests": requests, "concurrency": concurrency, "tokenizer": tokenizer, "refused": refused,
            "system_stats_before": _summary(before), "system_stats_during": _summary(during),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
            "alignment_200": _summary(latencies), "flood_seconds": wall,
            "requests_per_second": sum(v for k, v in statuses.items() if k != "not sent") / wall}


def _print(figures: dict) -> None:
    def line(name, s):
        if not s["n"]:
            return f"{name:<28} no samples"
        return f"{name:<28} median {s['median_ms']:8.1f} ms   p95 {s['p95_ms']:8.1f} ms   ({s['n']} samples)"

    kind = "requests refused before tokenizing (400)" if figures["refused"] else "alignment requests"
    print(f"{figures['requests']} {kind} ({figures['tokenizer']}), {figures['concurrency']} at a time, "
          f"against {figures['url']}")
    print(line("/system_stats before", figures["system_stats_before"]))
    print(line("/system_stats during flood", figures["system_stats_during"]))
    print(line("answers of status 200", figures["alignment_200"]))
    print(f"{'alignment statuses':<28} " + ", ".join(f"{k}: {v}" for k, v in figures["statuses"].items()))
    print(f"{'flood':<28} {figures['flood_seconds']:.1f} s, {figures['requests_per_second']:.0f} requests/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8188", help="a ComfyUI server on this machine")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--tokenizer", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--samples", type=int, default=50, help="/system_stats samples before the flood")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between /system_stats samples")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop submitting after this long")
    parser.add_argument("--refused", action="store_true",
                        help="send bodies the route refuses before tokenizing: the HTTP load alone, for comparison")
    parser.add_argument("--json", type=str, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        parser.error(f"{host!r} is not this machine: the flood only goes to {', '.join(LOCAL_HOSTS)}")
    figures = flood(url, args.requests, args.concurrency, args.tokenizer, args.samples, args.interval,
                    args.max_seconds, refused=args.refused)
    _print(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
