--[[ inflight: a level's in-flight set (<prefix>inflight:<level>), the admitted messages not yet ended,
each scored by the expiry of its lease (a dispatcher renews it while the call runs; llmq/pipeline/
inflight.py). Included by the scripts that change it.
]]
-- Admitted: holds one of the level's slots until released or until exp (Unix seconds).
local function inflight_hold(set, id, exp)
  redis.call('ZADD', set, exp, id)
end

-- Ended, or handed to retry: the slot is free.
local function inflight_release(set, id)
  redis.call('ZREM', set, id)
end

-- The number held now, after dropping leases that expired (their dispatcher died mid-call).
local function inflight_count(set, now)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  return redis.call('ZCARD', set)
end

-- The number each of n sets holds now (KEYS[first] to KEYS[first + n - 1], every level's), and their total.
local function inflight_counts(first, n, now)
  local held, total = {}, 0
  for j = 1, n do
    held[j] = inflight_count(KEYS[first + j - 1], now)
    total = total + held[j]
  end
  return held, total
end
