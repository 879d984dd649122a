"""The jobs of the peer benchmarks, for Dramatiq and for Celery, on the Redis named by PEER_REDIS_URL.

- ``noop`` does nothing but count itself (the queue's own cost).
- ``call`` is llmq's job done by hand: POST a chat request to PEER_BACKEND_URL and store the answer as a row of
  PEER_TABLE in PEER_DATABASE_URL, with one keep-alive HTTP client and one connection per thread.

Each job counts itself with one INCR of PEER_COUNTER, so the driver sees when all are done. Workers import
this module (``dramatiq benchmarks.peer_jobs`` / ``celery -A benchmarks.peer_jobs worker``); PEER_KIND picks
which of the two is set up, so neither library is imported for the other.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx
import psycopg
import redis

URL = os.environ["PEER_REDIS_URL"]
COUNTER = os.environ["PEER_COUNTER"]
QUEUE = os.environ["PEER_QUEUE"]
CHAT = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 200 + b'"}],"max_tokens":16}'
_counter = redis.Redis.from_url(URL)
_thread = threading.local()


def _noop() -> None:
    _counter.incr(COUNTER)


def _call() -> None:
    if not hasattr(_thread, "http"):
        _thread.http = httpx.Client(timeout=60)
        _thread.db = psycopg.connect(os.environ["PEER_DATABASE_URL"], autocommit=True)
    answer = _thread.http.post(
        os.environ["PEER_BACKEND_URL"] + "/chat/completions", content=CHAT, headers={"content-type": "application/json"}
    )
    answer.raise_for_status()
    table = os.environ["PEER_TABLE"]
    _thread.db.execute(f"INSERT INTO {table} (request, response) VALUES (%s, %s)", (CHAT.decode(), answer.text))
    _counter.incr(COUNTER)


noop: Any
call: Any
app: Any = None

if os.environ["PEER_KIND"] == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    dramatiq.set_broker(RedisBroker(url=URL, namespace=QUEUE))
    noop = dramatiq.actor(_noop, actor_name="noop", queue_name="bench", max_retries=0)
    call = dramatiq.actor(_call, actor_name="call", queue_name="bench", max_retries=0)

else:
    from celery import Celery

    app = Celery("peer_jobs", broker=URL)
    app.conf.update(task_ignore_result=True, task_default_queue=QUEUE, worker_hijack_root_logger=False)
    noop = app.task(_noop, name="noop")
    call = app.task(_call, name="call")


if __name__ == "__main__":
    # python -m benchmarks.peer_jobs JOB N: enqueue N jobs with the library's own API, then print the Unix
    # time the first one was sent (after the imports, so interpreter start-up is not counted).
    import sys
    import time

    job = {"noop": noop, "call": call}[sys.argv[1]]
    started = time.time()
    send = job.send if os.environ["PEER_KIND"] == "dramatiq" else job.delay
    for _ in range(int(sys.argv[2])):
        send()
    print(started, time.time())
