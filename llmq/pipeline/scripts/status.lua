--[[ status: every change of a message's status hash (<prefix>msg:<id>), one function per transition.
Included by each script that changes it; llmq/pipeline/transitions.py builds the commit effects that call
them. The hash's fields: status, level, attempts, enqueued_at, scheduled_at, started_at, retry_at,
finished_at, cancelled_at, replayed_at, backend, result, error, streamed, abort, behind, left_mark, and
the sets that count it for its tenant's quotas: open (accepted, not ended) and running (admitted, not ended
nor waiting to retry), each holding the hash's own key while it counts.
]]
local function status_of(hash)
  return redis.call('HGET', hash, 'status')
end

-- No longer running for its tenant (max_in_flight): it ended, or waits to retry.
local function status_stopped(hash)
  local running = redis.call('HGET', hash, 'running')
  if running then redis.call('ZREM', running, hash) end
end

-- Ended: no longer one of its tenant's open messages (max_queued), nor running.
local function status_closed(hash)
  local open = redis.call('HGET', hash, 'open')
  if open then redis.call('ZREM', open, hash) end
  status_stopped(hash)
end

-- Submitted: queued in its level; the hash lives ttl seconds at most until the message ends. A streamed
-- message (streamed '1') says so: its events are in its events stream. With left_mark (the count of the
-- level's entries that had left it), 'behind' (the depth before it) tells its position later.
local function status_queued(hash, level, now, ttl, streamed, behind, left_mark)
  redis.call('HSET', hash, 'status', QUEUED, 'level', level, 'attempts', 0, 'enqueued_at', now)
  if streamed == '1' then redis.call('HSET', hash, 'streamed', 1) end
  if left_mark then redis.call('HSET', hash, 'behind', behind, 'left_mark', left_mark) end
  redis.call('EXPIRE', hash, ttl)
end

-- Admitted by the scheduler: handed to dispatch, and running for its tenant (when admit.lua named its set).
local function status_scheduled(hash, now)
  redis.call('HSET', hash, 'status', SCHEDULED, 'scheduled_at', now)
  local running = redis.call('HGET', hash, 'running')
  if running then redis.call('ZADD', running, now, hash) end
end

-- Taken by a dispatcher, about to be sent to a backend.
local function status_dispatching(hash, now)
  redis.call('HSET', hash, 'status', DISPATCHING, 'started_at', now)
end

-- Waiting for another attempt, with fields (field, value, ...), unless it ended meanwhile (a cancel won
-- the race: it stays cancelled).
local function status_retrying(hash, ...)
  status_stopped(hash)
  if not ENDED[status_of(hash)] then
    redis.call('HSET', hash, 'status', RETRYING, ...)
    redis.call('HDEL', hash, 'behind', 'left_mark')  -- queued again at the end: its first position is no more
  end
end

-- Its retry fell due: queued in its level again, unless it ended meanwhile.
local function status_requeued(hash)
  if not ENDED[status_of(hash)] then redis.call('HSET', hash, 'status', QUEUED) end
end

-- Reached its end: the terminal status and the outcome's fields (field, value, ..., 'status' among
-- them); the hash is kept ttl seconds.
local function status_ended(hash, ttl, ...)
  status_closed(hash)
  redis.call('HSET', hash, ...)
  redis.call('EXPIRE', hash, ttl)
end

-- An end that a cancel overtook: the hash stays cancelled, and is kept ttl seconds.
local function status_cancel_kept(hash, ttl)
  status_closed(hash)
  redis.call('EXPIRE', hash, ttl)
end

-- Cancelled by its client before it reached a backend.
local function status_cancelled(hash, now)
  status_closed(hash)
  redis.call('HSET', hash, 'status', CANCELLED, 'cancelled_at', now)
end

-- Its streamed call is to stop (its client went away after it reached a backend): the dispatcher sees it
-- at its next relayed chunk (scripts/relay-2.lua).
local function status_abort(hash)
  redis.call('HSET', hash, 'abort', 1)
end

-- Replayed from the dead-letter queue: live again as `status`, attempts reset, kept until it ends (a hash
-- that had expired is made again, streamed '1' saying it is a streamed message).
local function status_replayed(hash, status, now, streamed)
  redis.call('PERSIST', hash)
  redis.call('HSET', hash, 'status', status, 'attempts', 0, 'replayed_at', now)
  if streamed == '1' then redis.call('HSET', hash, 'streamed', 1) end
  redis.call('HDEL', hash, 'error', 'result', 'finished_at', 'abort', 'behind', 'left_mark')
end

-- Archived: kept only ttl seconds more (never lengthened, and none given to a hash that has none: a
-- message a replay made live again).
local function status_shortened(hash, ttl)
  redis.call('EXPIRE', hash, ttl, 'XX', 'LT')
end
