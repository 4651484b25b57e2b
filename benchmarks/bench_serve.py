"""`kidney-edge serve` under concurrent load, against `kidney-edge benchmark`'s model-only figure.

    python benchmarks/bench_serve.py --model /tmp/demo-record/export/model.onnx \\
        --images /tmp/demo-record/holdout --clients 1,32,32,32 --duration 60
    python benchmarks/bench_serve.py --render-only        # rewrite serve.md from serve.json

One run, one machine, in this order:
1. ``kidney-edge benchmark --precision fp32`` on the same model file (``harness.model_only``:
   its own process, random inputs after warm-up): model-only images/s at each batch size, one batch at a time on every core and in
   the runtime's own layout (batches side by side, as serve runs them); measured again after
   step 3, and the ratio divides by the best figure of the two (load from other jobs only
   lowers it);
2. ``kidney-edge serve`` started as its own process on 127.0.0.1 (the real CLI and uvicorn);
3. per client count: a warm-up, then ``--duration`` seconds in which every client (an asyncio
   task with its own keep-alive connection, speaking minimal HTTP/1.1 so that the generator
   takes little CPU from the server) POSTs hold-out JPEGs as raw bodies to /v1/predict back to
   back. Bounded by ``--duration`` and ``--max-requests``; 127.0.0.1 only.
Reported: errors (any non-200 or exception), p50/p99/max latency, images/s and its ratio to
the best model-only images/s of any batch size and layout (and, beside it, of one batch at a
time), mean ONNX batch size (from /metrics), CPU seconds of the server
and of the load generator, and the labels' accuracy against the hold-out folders (a check that
answers are right, not only fast). The load generator shares the CPUs with the server: its CPU
time is recorded beside the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness
import numpy as np

from kidney_edge.runtime import available_cpus, scan_images

RESULTS = harness.RESULTS / "serve"
TARGET_RATIO = 0.7  # served images/s over model-only images/s at 32 clients
MIN_CLIENTS_FOR_TARGET = 32
MODEL_ONLY_BATCHES = (1, 8, 16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/demo-record/export/model.onnx"))
    parser.add_argument("--images", type=Path, default=Path("/tmp/demo-record/holdout"))
    parser.add_argument(
        "--clients", default="1,32,32,32", help="comma-separated concurrent client counts, one run each"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per client count")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of untimed load first")
    parser.add_argument("--max-requests", type=int, default=200_000, help="hard cap per client count")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (both; default: each one's own layout)"
    )
    parser.add_argument("--serve-args", default="", help="extra `kidney-edge serve` options")
    parser.add_argument("--out", type=Path, default=RESULTS, help="OUT.json and OUT.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--note", action="append", default=[], help="a paragraph under the model line (kept)")
    return parser.parse_args()


def model_only(model: Path, threads: int | None) -> dict[str, Any]:
    """fp32 model-only rows at every batch size of :data:`MODEL_ONLY_BATCHES` (:func:`harness.model_only`)."""
    return harness.model_only(
        model, precision="fp32", batch_sizes=MODEL_ONLY_BATCHES, threads=threads, iterations=30, warmup=5
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def parse_metrics(text: str) -> dict[str, float]:
    """The few /metrics samples this report uses, by their full sample name."""
    wanted = ("kidney_edge_batch_size_sum", "kidney_edge_batch_size_count")
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(wanted) or name.startswith("kidney_edge_stage_duration_seconds_sum"):
            values[name] = float(value)
        elif name.startswith("kidney_edge_stage_duration_seconds_count"):
            values[name] = float(value)
    return values


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for this test.

    A raw asyncio client costs a fraction of httpx's CPU per request; on a 2-core machine the
    load generator's CPU is taken from the server it measures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)


def request_head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def load(
    port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float, cap: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    correct = answered = 0
    stop_at = time.perf_counter() + seconds
    heads = [request_head(port, len(body)) for body, _ in bodies]

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def one_client(offset: int) -> None:
        nonlocal correct, answered
        index, connection = offset, None
        while time.perf_counter() < stop_at and len(latencies) + sum(errors.values()) < cap:
            body, truth = bodies[index % len(bodies)]
            head = heads[index % len(bodies)]
            index += clients
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = _Connection(*await asyncio.open_connection("127.0.0.1", port))
                status, payload = await connection.post(head, body)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                error(type(exc).__name__)
                connection = None
                continue
            if status != 200:
                error(str(status))
                continue
            latencies.append(time.perf_counter() - started)
            answered += 1
            correct += json.loads(payload)["label"] == truth
        if connection is not None:
            connection.writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "images_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "mean": round(float(ms.mean()), 1),
            "max": round(float(ms.max()), 1),
        },
        "accuracy": round(correct / answered, 4) if answered else None,
    }


def run_clients(
    url: str, pid: int, bodies: list[tuple[bytes, str]], clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    port = int(url.rsplit(":", 1)[1])
    asyncio.run(load(port, bodies, clients, args.warmup, args.max_requests))  # untimed
    before_metrics = parse_metrics(httpx.get(url + "/metrics").text)
    server_cpu, own_cpu = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    load_before = harness.load_average()
    result = asyncio.run(load(port, bodies, clients, args.duration, args.max_requests))
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    result["server_cpu_s"] = round(cpu_seconds(pid) - server_cpu, 1)
    result["load_generator_cpu_s"] = round(
        (own_after.ru_utime + own_after.ru_stime) - (own_cpu.ru_utime + own_cpu.ru_stime), 1
    )
    after_metrics = parse_metrics(httpx.get(url + "/metrics").text)
    delta = {k: after_metrics.get(k, 0.0) - before_metrics.get(k, 0.0) for k in after_metrics}
    batches = delta.get("kidney_edge_batch_size_count", 0.0)
    result["mean_batch_size"] = (
        round(delta.get("kidney_edge_batch_size_sum", 0.0) / batches, 2) if batches else None
    )
    for stage in ("decode", "queue", "inference"):
        total = delta.get(f'kidney_edge_stage_duration_seconds_sum{{stage="{stage}"}}', 0.0)
        count = delta.get(f'kidney_edge_stage_duration_seconds_count{{stage="{stage}"}}', 0.0)
        result[f"mean_{stage}_ms"] = round(total / count * 1000, 2) if count else None
    result["load_average_before"] = load_before
    result["load_average_after"] = harness.load_average()
    return result


def start_server(model: Path, port: int, threads: int | None, extra: str, log: Path) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "kidney_edge", "serve", "--model", str(model), "--port", str(port),
               *(["--threads", str(threads)] if threads else []), *extra.split()]  # fmt: skip
    server = subprocess.Popen(command, cwd=harness.REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not become ready in 120 s; see {log}")


def read_bodies(folder: Path) -> list[tuple[bytes, str]]:
    files = scan_images(folder)
    if not files:
        raise SystemExit(f"no images under {folder}")
    return [(path.read_bytes(), path.parent.name) for path in files]


def _layout(row: dict[str, Any]) -> str:
    workers = row.get("workers", 1)
    return f"batch {row['batch_size']}" + (f", {workers} x {row['threads']} thread" if workers > 1 else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = args.threads  # None: serve and benchmark each in the runtime's default layout
    bodies = read_bodies(args.images)
    record = harness.start_record(
        model=str(args.model), images=f"{args.images} ({len(bodies)} files, raw JPEG bodies, cycled)",
        threads=threads, cpus=available_cpus(), serve_args=args.serve_args, duration_s=args.duration,
        model_only=[], runs=[],
    )  # fmt: skip
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        server = start_server(args.model, port, threads, args.serve_args, log)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                print("model-only benchmark ...", flush=True)
                record["model_only"].append(model_only(args.model, threads))  # the server idles
                print(f"{clients} clients for {args.duration:.0f} s ...", flush=True)
                record["runs"].append(
                    run_clients(f"http://127.0.0.1:{port}", server.pid, bodies, clients, args)
                )
                print(json.dumps(record["runs"][-1]), flush=True)
            print("model-only benchmark ...", flush=True)
            record["model_only"].append(model_only(args.model, threads))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    # Each run divides by the best model-only figure (any batch size) measured right before or
    # right after it: load from other jobs comes and goes, and can only lower a measurement.
    for index, result in enumerate(record["runs"]):
        around = record["model_only"][index : index + 2]
        result["model_only_images_per_s"] = max(harness.best_images_per_s(m) for m in around)
        result["ratio_to_model_only"] = round(result["images_per_s"] / result["model_only_images_per_s"], 3)
        one_batch = max(harness.one_batch_images_per_s(m) for m in around)
        result["model_only_one_batch_images_per_s"] = one_batch
        result["ratio_to_one_batch"] = round(result["images_per_s"] / one_batch, 3)
    loaded = [r for r in record["runs"] if r["clients"] >= MIN_CLIENTS_FOR_TARGET]
    record["median_ratio_at_target_clients"] = (
        float(np.median([r["ratio_to_model_only"] for r in loaded])) if loaded else None
    )
    record["median_ratio_to_one_batch_at_target_clients"] = (
        float(np.median([r["ratio_to_one_batch"] for r in loaded])) if loaded else None
    )
    return harness.finish_record(record)


def render(record: dict[str, Any]) -> str:
    machine = record["machine"]
    vnni = machine["isa_flags"].get("avx512_vnni") or machine["isa_flags"].get("avx_vnni")
    serve_args = f" --serve-args {record['serve_args']!r}" if record["serve_args"] else ""
    lines = [
        "# `kidney-edge serve` under load",
        "",
        f"Recorded {harness.recorded(record, 'started_utc')} by `benchmarks/bench_serve.py` (`--duration {record['duration_s']:g}`{serve_args}).",
        f"Machine: {machine['cpu_model']} ({'AVX-512 VNNI' if vnni else 'no VNNI'}), "
        f"{machine['cores_usable']} usable CPUs, onnxruntime {machine['onnxruntime']}, "
        f"{_threads_words(record)}. Load average (1, 5, 15 min) at start "
        f"{harness.recorded_load(record, 'before')}, at end {harness.recorded_load(record, 'after')} (a shared machine: other "
        "jobs ran during the measurements).",
        f"Model: `{record['model']}`. Images: {record['images']}.",
        *([""] + record["notes"] if record.get("notes") else []),
        "",
        "## Model-only (`kidney-edge benchmark`, in the same run)",
        "",
        f"`{record['model_only'][0]['command']}`, before every load run and after the last one "
        "(the server idles meanwhile).",
        "",
        "| measurement | "
        + " | ".join(f"{_layout(r)} images/s" for r in record["model_only"][0]["rows"])
        + " |",
        "| ---: | " + " | ".join("---:" for _ in record["model_only"][0]["rows"]) + " |",
        *(
            f"| {i + 1} | " + " | ".join(f"{r['images_per_s']:.1f}" for r in m["rows"]) + " |"
            for i, m in enumerate(record["model_only"])
        ),
        "",
        "## Served (`kidney-edge serve` on 127.0.0.1, raw JPEG bodies to `POST /v1/predict`)",
        "",
        "Each run's ratios divide its images/s by model-only figures measured right before or right "
        "after it: the target ratio by the best of `benchmark`'s one-batch-at-a-time rows (any batch "
        "size; the figure the target was set against), the other by the best row of any batch size and "
        "layout, batches side by side included (the model's own ceiling on these cores).",
        "",
        "| run | clients | seconds | requests | errors | p50 ms | p99 ms | max ms | images/s | best model-only images/s "
        "| ratio to one batch at a time (target) | ratio to the best layout | mean ONNX batch | decode ms | queue ms | inference ms (batch) | server CPU s "
        "| load-generator CPU s | label accuracy | load before → after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for i, r in enumerate(record["runs"]):
        lat = r["latency_ms"]
        lines.append(
            f"| {i + 1} | {r['clients']} | {r['seconds']} | {r['requests']} | {r['errors']} | {lat['p50']} "
            f"| {lat['p99']} | {lat['max']} | {r['images_per_s']:.1f} | {r['model_only_images_per_s']:.1f} "
            f"| {_ratio(r.get('ratio_to_one_batch'))} | {r['ratio_to_model_only']:.2f} | {r['mean_batch_size']} | {r['mean_decode_ms']} "
            f"| {r['mean_queue_ms']} | {r['mean_inference_ms']} | {r['server_cpu_s']} "
            f"| {r['load_generator_cpu_s']} | {r['accuracy']} | {harness.recorded_load(r, 'before')} → {harness.recorded_load(r, 'after')} |"
        )
    target_runs = [r for r in record["runs"] if r["clients"] >= MIN_CLIENTS_FOR_TARGET]
    lines += ["", "## Verdict", ""]
    if target_runs:
        errors = sum(r["errors"] for r in target_runs)
        median = record["median_ratio_to_one_batch_at_target_clients"]
        met = errors == 0 and median >= TARGET_RATIO
        ratios = ", ".join(f"{r['ratio_to_one_batch']:.2f}" for r in target_runs)
        lines.append(
            f"{len(target_runs)} run(s) of >= {MIN_CLIENTS_FOR_TARGET} clients for {record['duration_s']:g} s: "
            f"{errors} errors in all; ratio to `benchmark`'s model-only figure (one batch at a time) {ratios}, "
            f"median {median:.2f} (target >= {TARGET_RATIO} with zero errors): **{'met' if met else 'missed'}**."
        )
        lines.append(
            "Against the model's best figure with batches side by side (the runtime's own layout): median "
            f"{record['median_ratio_at_target_clients']:.2f}; decoding alone caps that ratio (see below)."
        )
    lines += cpu_budget(record, target_runs)
    lines += [
        "",
        "Latency is per request, client side, from send to parsed answer. `decode`, `queue` and "
        "`inference` are the server's own per-image means from `/metrics` (`decode` includes the resize "
        "to the input size; `inference` is the time of the ONNX batch the image rode in, preprocessing "
        "to the input array and the decision rule included). The load generator runs on the same CPUs as "
        "the server, so its CPU seconds are time the server could not use.",
        "",
    ]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _threads_words(record: dict[str, Any]) -> str:
    if record["threads"] is None:
        return "serve in its default layout (one model worker per core, one onnxruntime thread each)"
    return f"{record['threads']} onnxruntime threads per worker"


def cpu_budget(record: dict[str, Any], target_runs: list[dict[str, Any]]) -> list[str]:
    """Where the CPU goes, from the recorded figures: the server's CPU per image under load
    against the model's own (all intra-op threads busy for 1 / images_per_s each image)."""
    single = [r for r in record["runs"] if r["clients"] == 1]
    if not target_runs:
        return []
    served = float(np.median([r["server_cpu_s"] * 1000 / r["requests"] for r in target_runs]))
    cores = record.get("cpus") or record["threads"]
    model = float(np.median([cores * 1000 / r["model_only_images_per_s"] for r in target_runs]))
    inference = float(np.median([r["mean_inference_ms"] / r["mean_batch_size"] for r in target_runs]))
    model_wall = float(np.median([1000 / r["model_only_images_per_s"] for r in target_runs]))
    lines = [
        "",
        "## Where the time goes",
        "",
        f"- Under load the server spends {served:.1f} ms of CPU per image (median of the runs above); "
        f"the model alone needs at most {model:.1f} ms ({cores} cores for "
        f"{model_wall:.2f} ms of wall time per image at the best model-only batch size and layout).",
        f"- Inside the server an ONNX batch takes {inference:.2f} ms per image, against {model_wall:.2f} ms "
        "model-only: on 2 cores the model shares them with decoding, HTTP and the event loop.",
    ]
    if single:
        decode = single[0]["mean_decode_ms"]
        lines.append(
            f"- Decoding and resizing one 512 px JPEG takes {decode:.2f} ms when requests come "
            "one at a time (the 1-client run): the same `load_image` + `resized_image` that `predict` runs. "
            f"With the model's {model:.1f} ms that alone caps the ratio to the best layout at "
            f"{model / (model + decode):.2f}, before HTTP and the event loop "
            f"(about {served - model - decode:.1f} ms per image here)."
        )
    return lines


def main() -> None:
    args = parse_args()
    if args.render_only:
        record = harness.read_results(args.out)
        record["notes"] = [*record.get("notes", []), *args.note]
        harness.write_results(args.out, record, render(record))
        return
    record = {**run(args), "notes": args.note}
    harness.write_results(args.out, record, render(record))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
