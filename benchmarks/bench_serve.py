"""Aggregate generated tokens/s of `lmforge serve` for 1, 4 and 16 concurrent streaming clients.

The server runs as its own process (`python -m lmforge serve`), as in production; the clients
are asyncio tasks that stream /v1/completions (SSE) and count the completion tokens the final
usage chunk reports. Each client sends --requests requests one after another, each generating
exactly --max-tokens tokens (`ignore_eos`). Continuous batching should make 16 clients much
faster in aggregate than one: the target is >= 5x. Ends with one JSON line.

    python benchmarks/bench_serve.py [--models tiny,smollm2] [--clients 1,4,16] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["Once upon a time", "The weather today is", "In the beginning", "My favourite food is",
           "The history of Rome", "Write a story about a cat", "The quick brown fox", "To be or not to be"]


def tiny_model(directory: Path) -> str:
    """A tiny preset GPT with a byte-level tokenizer, saved where `lmforge serve` can load it."""
    import torch

    import lmforge
    from lmforge.model.loading import save_pretrained
    from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer

    torch.manual_seed(0)
    tokenizer = BPETokenizer.from_merges([], special_tokens=DEFAULT_SPECIAL_TOKENS)
    model, _ = lmforge.load("tiny", tokenizer=tokenizer)
    return str(save_pretrained(model, tokenizer, directory / "tiny"))


class Server:
    """`python -m lmforge serve ...` in a subprocess, up once /health answers."""

    def __init__(self, ref: str, port: int, extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "lmforge", "serve", "--model", ref, "--model-name", "bench",
                   "--port", str(port), "--max-batch-size", "16", *extra]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not come up in time")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """Stream one completion; return (completion tokens, seconds to the first text)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - start


async def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(aggregate generated tokens/s, mean time to first token) for `clients` concurrent clients."""
    async def client_loop(index: int, client: httpx.AsyncClient) -> list[tuple[int, float]]:
        return [await one_request(client, url, PROMPTS[(index + r) % len(PROMPTS)], max_tokens)
                for r in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        seconds = time.perf_counter() - start
    flat = [item for per_client in results for item in per_client]
    return sum(tokens for tokens, _ in flat) / seconds, sum(first for _, first in flat) / len(flat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="tiny and/or smollm2, or any lmforge REF")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--server-args", default="--threads 1",
                        help="extra `lmforge serve` flags (one torch thread by default: see bench_decode.py)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    rows, figures = [], {"benchmark": "serve", "max_tokens": args.max_tokens, "requests_per_client": args.requests}
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            ref = tiny_model(Path(directory)) if name == "tiny" else \
                "smollm2-135m-instruct" if name == "smollm2" else name
            server = Server(ref, args.port, ["--max-seq-len", "512", *args.server_args.split()])
            try:
                server.wait_ready()
                asyncio.run(run_clients(server.url, 1, 1, 8))          # warm-up
                speeds = {}
                for clients in levels:
                    speed, first = asyncio.run(run_clients(server.url, clients, args.requests, args.max_tokens))
                    speeds[clients] = speed
                    rows.append((name, clients, speed, speed / speeds[levels[0]], first))
                    figures[f"{name}_clients{clients}_tokens_per_s"] = round(speed, 2)
                    figures[f"{name}_clients{clients}_ttft_s"] = round(first, 3)
                figures[f"{name}_speedup_{levels[-1]}_vs_{levels[0]}"] = round(speeds[levels[-1]] / speeds[levels[0]], 2)
            finally:
                server.stop()

    print(f"lmforge serve: aggregate generated tokens/s, {args.requests} x {args.max_tokens}-token streaming "
          "requests per client")
    print(f"{'model':<10} {'clients':>7} {'tokens/s':>10} {'vs 1 client':>12} {'mean TTFT s':>12}")
    for name, clients, speed, ratio, first in rows:
        print(f"{name:<10} {clients:>7} {speed:>10.1f} {ratio:>11.2f}x {first:>12.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
