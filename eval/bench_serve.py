"""Benchmark: `nlgkd serve` with dynamic batching vs one request at a time, at 1 and 16 concurrent clients,
side by side in one run, over real HTTP (uvicorn on 127.0.0.1), serving the demo's teacher.

    python eval/bench_serve.py [--requests 64] [--rounds 3] [--runs-dir runs]

Each client sends greedy chat requests (the demo's test records, max_tokens 48) one after another; the
figure is completed requests per second. The four settings take turns round by round, so background load
hits them alike; the median of the rounds is printed. Goal (issue 19): >= 4x at 16 clients on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from common import demo_with


def ask(port: int, source: str) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": source}], "temperature": 0, "max_tokens": 48})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        answer.read()


def throughput(port: int, sources: list[str], clients: int) -> float:
    """Requests per second when `clients` clients share `sources`, each sending its next when answered."""
    shares = [sources[i::clients] for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda share: [ask(port, s) for s in share], shares))
    return len(sources) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    from nlgkd.models import load_pretrained
    from nlgkd.serve import BackgroundServer, ServedModel, create_app

    runner = demo_with([], runs_dir=args.runs_dir)  # the demo's teacher (trained here if runs/demo lacks it)
    model, tokenizer = load_pretrained(str(runner.run_dir / "teacher"))
    sources = list(runner.data()["test"]["source"])[: args.requests]
    servers = {"one at a time": ServedModel(model, tokenizer, "teacher", max_batch=1),
               "batched (16, 5 ms)": ServedModel(model, tokenizer, "teacher", max_batch=16, batch_wait_ms=5)}
    results: dict[tuple[str, int], list[float]] = {}
    with BackgroundServer(create_app(servers["one at a time"])) as single, \
            BackgroundServer(create_app(servers["batched (16, 5 ms)"])) as batched:
        ports = {"one at a time": single.port, "batched (16, 5 ms)": batched.port}
        for name, port in ports.items():  # warm-up: the first generate calls of a model are slow
            throughput(port, sources[:8], 4)
        for _ in range(args.rounds):
            for clients in (16, 1):
                for name, port in ports.items():
                    results.setdefault((name, clients), []).append(throughput(port, sources, clients))
    print(f"\n{len(sources)} greedy requests per measurement, median of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}:")
    median = {key: statistics.median(values) for key, values in results.items()}
    for (name, clients), value in sorted(median.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {name:20s} {clients:2d} client(s): {value:7.2f} requests/s")
    for clients in (1, 16):
        ratio = median[("batched (16, 5 ms)", clients)] / median[("one at a time", clients)]
        print(f"ratio at {clients:2d} client(s): batched / one at a time = {ratio:.2f}x"
              + ("  (goal >= 4x)" if clients == 16 else "  (goal: about 1x, the wait costs little)"))
    print(json.dumps({f"{name}@{clients}": value for (name, clients), value in median.items()}))


if __name__ == "__main__":
    main()
