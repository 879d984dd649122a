"""schedule: admit messages from the level streams to the dispatch stream, in priority order, only as many
as the backends can start now.

- ``intake``: one consuming stage per level, reading that level's stream alone;
- ``arbiter``: one per process, ordering what waits in every level and admitting it atomically;
- ``admission``: which waiting messages take the free slots next (pure functions, the strategies);
- ``stagger``: spacing the lower levels' admissions while calls take a regular time.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.stage import Stage
from llmq.stages.schedule.arbiter import Arbiter
from llmq.stages.schedule.intake import LevelIntake, OwningIntake


def make_stages(*, config: Config, redis: aioredis.Redis, keys: Keys) -> list[Stage]:
    arbiter = Arbiter(config, redis=redis, keys=keys)
    levels = sorted(config.queue.levels, key=lambda lv: lv.priority)
    return [
        (OwningIntake if i == 0 else LevelIntake)(lv, config=config, redis=redis, keys=keys, arbiter=arbiter)
        for i, lv in enumerate(levels)
    ]
