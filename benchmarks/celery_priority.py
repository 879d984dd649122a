"""Celery with its documented Redis priority setup, for the overload benchmark (``overload_bench``): the job
is llmq's, POST a chat request to the backend; each records how long it waited, from its send to its start.

Settings, as Celery's documentation gives them for priorities on Redis: ``queue_order_strategy: priority``
with ``priority_steps`` 0-9 (0 is served first), ``worker_prefetch_multiplier`` 1 and ``task_acks_late``
(a worker holds no more than it runs), one worker of 8 threads. The environment names the Redis
(PEER_REDIS_URL), the queue (PEER_QUEUE), the backend (PEER_BACKEND_URL) and the list that collects the
waits (PEER_WAITS).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import redis
from celery import Celery

URL = os.environ["PEER_REDIS_URL"]
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
_redis = redis.Redis.from_url(URL)
_thread = threading.local()

app = Celery("celery_priority", broker=URL)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=os.environ["PEER_QUEUE"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"queue_order_strategy": "priority", "priority_steps": list(range(10))},
    worker_hijack_root_logger=False,
)


@app.task(name="call")
def call(level: str, sent_at: float) -> None:
    waited = time.time() - sent_at
    if not hasattr(_thread, "http"):
        _thread.http = httpx.Client(timeout=60)
    answer = _thread.http.post(
        os.environ["PEER_BACKEND_URL"] + "/chat/completions", content=CHAT, headers={"content-type": "application/json"}
    )
    answer.raise_for_status()
    _redis.rpush(os.environ["PEER_WAITS"], f"{level} {sent_at} {waited} {time.time()}")
