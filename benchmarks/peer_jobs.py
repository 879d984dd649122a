"""The no-op job of the peer benchmark, for Dramatiq and for Celery, on the Redis named by PEER_REDIS_URL.

Each job counts itself with one INCR of PEER_COUNTER, so the driver sees when all are done. Workers
import this module (``dramatiq benchmarks.peer_jobs`` / ``celery -A benchmarks.peer_jobs worker``);
PEER_KIND picks which of the two is set up, so neither library is imported for the other.
"""

from __future__ import annotations

import os
from typing import Any

import redis

URL = os.environ["PEER_REDIS_URL"]
COUNTER = os.environ["PEER_COUNTER"]
QUEUE = os.environ["PEER_QUEUE"]
_counter = redis.Redis.from_url(URL)

noop: Any
app: Any = None

if os.environ["PEER_KIND"] == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    dramatiq.set_broker(RedisBroker(url=URL, namespace=QUEUE))

    @dramatiq.actor(queue_name="bench", max_retries=0)
    def noop() -> None:
        _counter.incr(COUNTER)

else:
    from celery import Celery

    app = Celery("peer_jobs", broker=URL)
    app.conf.update(task_ignore_result=True, task_default_queue=QUEUE, worker_hijack_root_logger=False)

    @app.task(name="noop")
    def noop() -> None:
        _counter.incr(COUNTER)


if __name__ == "__main__":
    # python -m benchmarks.peer_jobs N: enqueue N jobs with the library's own API, then print the Unix
    # time the first one was sent (after the imports, so interpreter start-up is not counted).
    import sys
    import time

    started = time.time()
    send = noop.send if os.environ["PEER_KIND"] == "dramatiq" else noop.delay
    for _ in range(int(sys.argv[1])):
        send()
    print(started, time.time())
