"""Tenants sharing one level: what share of a saturated backend each gets while they all have a backlog.

The workload: one backend of 8 slots answering in a fixed 50 ms (the mock, a process), ingest, schedule,
dispatch and retry as processes, one level. Each variant queues every tenant's backlog at once, interleaved
in proportion to their sizes (seeded), then reads each message's ``scheduled_at``. A tenant's share is its
estimated tokens (prompt characters / 4 + max_tokens) admitted, divided by its weight, out of everyone's,
over the window in which every tenant still had messages waiting: up to the first admission after which one
of them had none left.

- **noisy neighbour**: tenant A queues 10 times tenant B's messages (1,500 and 150; A's 257 tokens each,
  B's 65). Target: B gets at least 45 % of the tokens admitted. The reference, in the same run: the same
  backlog sent under one tenant, as llmq admitted before tenants had shares (first in, first out), where B
  gets what it sends, 1/11 of the messages.
- **four tenants** of 100, 200, 400 and 800 messages (513, 257, 129 and 65 tokens each), equal weights,
  then weights 1:2:3:4. Target: Jain's index over the weighted shares at least 0.95 (1.0: exactly even).
- **beyond the lookahead**: the noisy neighbour with A's backlog four times ``scheduler.lookahead``: a
  scheduler orders only the messages it holds, so B's share falls toward its share of arrivals. Then the
  remedy: the same offer with A's ``max_queued`` at 1,500, so the 6,500 past it are refused (429) and what
  is queued fits the lookahead.

    .venv/bin/python -m benchmarks.fairness_bench [--redis-url URL]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from typing import Any

import httpx
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, poll_until, redis_url, run_env, stages, write_result
from llmq.pipeline.keys import Keys
from llmq.pipeline.tokens import estimate_tokens

SLOTS = 8
LATENCY_MS = 50
LOOKAHEAD = 2000


def chat(max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else float("nan")


async def run(
    url: str,
    name: str,
    tenants: dict[str, tuple[int, int]],
    *,
    weights: dict[str, int] | None = None,
    max_queued: dict[str, int] | None = None,
    one_tenant: bool = False,
) -> dict[str, Any]:
    """``tenants``: name -> (messages, max_tokens). With ``one_tenant``, every message is sent without a tenant
    (the reference), and told apart by its metadata only."""
    prefix = "{fair" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    weights = weights or {}
    limits = {
        t: f"weight: {weights.get(t, 1)}" + (f", max_queued: {max_queued[t]}" if t in (max_queued or {}) else "")
        for t in tenants
    }
    total = sum(n for n, _ in tenants.values())
    env = run_env(url, prefix, api) | {
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(total + 1000),
        "LLMQ_QUEUE__LEVELS": f"[{{name: normal, priority: 3, max_wait_time: 600s, max_concurrent: {SLOTS}}}]",
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: {SLOTS}}}]',
        "LLMQ_SCHEDULER__LOOKAHEAD": str(LOOKAHEAD),
        "LLMQ_TENANTS": "[" + ", ".join(f"{{name: {t}, {limit}}}" for t, limit in limits.items()) + "]",
    }
    rng = random.Random(7)
    order = [t for t, (n, _) in tenants.items() for _ in range(n)]
    rng.shuffle(order)
    items = [
        {"level": "normal", "request": chat(tenants[t][1]), "metadata": {"t": t}}
        | ({} if one_tenant else {"tenant": t})
        for t in order
    ]
    argvs = [["run", "mock-backend", "--port", str(mock)], ["run", "ingest"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry")]
    keys = Keys(prefix)
    r = aioredis.Redis.from_url(url)
    with stages(env, *argvs):
        async with httpx.AsyncClient(timeout=60) as http:
            await http.post(f"http://127.0.0.1:{mock}/admin/config", json={"latency_ms": LATENCY_MS})
            accepted: list[tuple[str, str]] = []  # (id, tenant) of each message queued (not refused by a quota)
            for i in range(0, len(items), 1000):
                reply = await http.post(f"http://127.0.0.1:{api}/api/v1/messages/batch", json=items[i : i + 1000])
                reply.raise_for_status()
                accepted += [
                    (m["id"], t) for m, t in zip(reply.json(), order[i : i + 1000], strict=True) if m.get("id")
                ]
            ids = [mid for mid, _ in accepted]
            order = [t for _, t in accepted]
            first_out = {t: [i for i, x in accepted if x == t] for t in tenants}

            async def one_ran_out() -> bool:
                # every tenant's backlog is gone once one of them has all of its messages admitted
                pipe = r.pipeline(transaction=False)
                for mids in first_out.values():
                    pipe.hget(keys.msg(mids[-1]), "scheduled_at")
                return any(x is not None for x in await pipe.execute())

            await poll_until(one_ran_out, timeout_s=600, what="a tenant's backlog to be admitted")
            await asyncio.sleep(1.0)  # the admissions of that round are all written
            pipe = r.pipeline(transaction=False)
            for mid in ids:
                pipe.hget(keys.msg(mid), "scheduled_at")
            admitted_at = [float(x) if x is not None else None for x in await pipe.execute()]
    await r.aclose()
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    return summary(name, tenants, weights, order, admitted_at)


def summary(
    name: str,
    tenants: dict[str, tuple[int, int]],
    weights: dict[str, int],
    order: list[str],
    admitted_at: list[float | None],
) -> dict[str, Any]:
    cost = {t: estimate_tokens(chat(mt)) for t, (_, mt) in tenants.items()}
    of = {t: [a for a, x in zip(admitted_at, order, strict=True) if x == t] for t in tenants}
    # the window: while every tenant had messages left, i.e. until the first tenant's last admission
    end = min(max(a for a in ats if a is not None) for ats in of.values() if None not in ats)
    tokens = dict.fromkeys(tenants, 0.0)
    for at, t in zip(admitted_at, order, strict=True):
        if at is not None and at < end:
            tokens[t] += cost[t]
    shares = {t: tokens[t] / weights.get(t, 1) for t in tenants}
    whole = sum(shares.values()) or 1.0
    doc = {
        "variant": name,
        "tenants": {
            t: {"offered": n, "queued": order.count(t), "tokens_each": cost[t], "weight": weights.get(t, 1)}
            for t, (n, _) in tenants.items()
        },
        "token_share": {t: shares[t] / whole for t in tenants},
        "jain": jain(list(shares.values())),
    }
    share_text = ", ".join(f"{t} {100 * s:.1f}%" for t, s in doc["token_share"].items())
    print(f"  {name:<48} weighted token shares: {share_text}; Jain {doc['jain']:.3f}", flush=True)
    return doc


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    print(f"fairness: one level, {SLOTS} slots x {LATENCY_MS} ms, lookahead {LOOKAHEAD}", flush=True)
    noisy = {"A": (1500, 256), "B": (150, 64)}
    four = {"t1": (100, 512), "t2": (200, 256), "t3": (400, 128), "t4": (800, 64)}
    results = []
    started = time.time()
    with redis_url(args.redis_url) as url:
        results.append(await run(url, "noisy neighbour: one tenant (FIFO, reference)", noisy, one_tenant=True))
        results.append(await run(url, "noisy neighbour: A and B", noisy))
        results.append(await run(url, "four tenants, equal weights", four))
        weighted = {"t1": 1, "t2": 2, "t3": 3, "t4": 4}
        results.append(await run(url, "four tenants, weights 1:2:3:4", four, weights=weighted))
        beyond = {"A": (4 * LOOKAHEAD, 256), "B": (400, 64)}
        results.append(await run(url, "noisy neighbour, A's backlog 4x lookahead", beyond))
        results.append(await run(url, "the same, A's max_queued 1500", beyond, max_queued={"A": 1500}))
    print(f"  ({time.time() - started:.0f} s)")
    write_result("fairness_bench", {"machine": machine(), "variants": results})


if __name__ == "__main__":
    asyncio.run(main())
