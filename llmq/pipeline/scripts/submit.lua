--[[ submit: put n messages into their level streams, each decided on its own: idempotency, backpressure,
XADD and its status hash at once.

Safe to repeat: a message whose status hash exists already was queued by an earlier run of this call (its
reply was lost and redis-py sent it again), and is not queued twice. A level's depth is read once per call
(lag + pending of the schedule group, XINFO GROUPS) and counted up as the call queues messages in it. The
status hash keeps the depth before the message and how many of the level's entries had left it then
(entries-read - pending), so its position can be told later from how many have left since.

A lone message may be admitted at once (scheduler.direct_admission): when no message waits in any level
and a slot is free for it, as admit.lua would judge (its level's max_concurrent; the backends' capacity less
the slots that levels of higher priority keep reserved and do not use, while they had a message within
scheduler.reserve_window), it goes straight to the dispatch stream with its slot held, and never waits for a
scheduler to wake. With anything waiting, it is queued. Each level's latest submission time is kept (the
levels' activity hash), for that window.

A tenant over a quota gets nothing queued: its open messages (accepted, not ended: a sorted set of their
status hashes, left by status.lua's ends) at max_queued, or a rate limit (rpm, tpm: GCRA, a minute's worth
allowed at once) that this message would pass. A repeated call counts nothing twice: it finds the hash.

KEYS       per message: its level stream, its status hash, its idempotency record, the record an earlier
           release kept for the same key (the same record again when none; see llmq/pipeline/submit.py),
           its tenant's open messages, its tenant's rates.
           A message without an idempotency key names a record it never reads (keys share one hash tag).
           With direct admission, then: every level's stream, every level's in-flight set (both in the
           order of the levels' ARGV below), the dispatch stream. Last: the paused levels' hash (a paused
           level's message is never admitted here), then the levels' activity hash.
ARGV[1]    status hash TTL in seconds      ARGV[2]  idempotency record TTL in seconds
ARGV[3]    m, the number of messages       ARGV[4]  now (Unix seconds) to admit a lone message directly, or ''
ARGV[5..]  per message: payload, message id, level, enqueued_at, the level's max depth, the digest of
           the request ('' when it has no idempotency key), '1' when it is streamed ('' when not), its
           tenant's max_queued, rpm and tpm ('' for none), its estimated tokens, '1' when its tenant has a
           max_in_flight (admit.lua counts its running messages: it is never admitted here)
then, with direct admission: the lease expiry of an in-flight slot, the backends' capacity, n (the number
of levels), the index of the message's level among them, the reserve window in seconds (0: reserved slots
are always kept), and per level: max_concurrent, reserved, priority, name.
Returns per message one of: {'queued', id, depth before it (-1: queued by an earlier run), 1 when it was
admitted directly}, {'duplicate', first id}, {'conflict', first id} (the key came with another request),
{'full', depth}, {'limited', the quota's name, seconds to wait, the quota, the tenant's figure now}.
]]
-- The level's depth, and the count of its entries that have left it (false when Redis cannot tell).
local function waiting(stream)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if ok then
    for _, g in ipairs(groups) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == SCHEDULE_GROUP and f['lag'] then
        -- a group that has read nothing yet says no entries-read: none has left
        local read = f['entries-read'] or (f['last-delivered-id'] == '0-0' and 0)
        local left = read and tonumber(read) - tonumber(f['pending'])
        return tonumber(f['pending']) + tonumber(f['lag']), left
      end
    end
  end
  return redis.call('XLEN', stream), false
end

-- Rate limits by GCRA: each limit's theoretical arrival time moves on by cost * 60 / rate; a request that
-- would move it more than a minute past now waits for the rest.
local RATE_WINDOW = 60
local function tat_after(rates, name, rate, cost, now)
  local tat = math.max(tonumber(redis.call('HGET', rates, name)) or 0, now)
  return tat + cost * RATE_WINDOW / rate
end

-- Which quota the message would break, how long until it would not, and the figure: or nil.
local function over_quota(open, rates, max_queued, rpm, tpm, tokens, now)
  if max_queued then
    redis.call('ZREMRANGEBYSCORE', open, '-inf', now)
    local n = redis.call('ZCARD', open)
    if n >= max_queued then return {'max_queued', 1, max_queued, n} end
  end
  local late, which = 0, nil
  for _, q in ipairs({{'rpm', rpm, 1}, {'tpm', tpm, tokens}}) do
    if q[2] then
      local wait = tat_after(rates, q[1], q[2], q[3], now) - now - RATE_WINDOW
      if wait > late then late, which = wait, q[1] end
    end
  end
  if which then
    local limit = which == 'rpm' and rpm or tpm
    return {which, math.ceil(late), limit, limit}
  end
end

local function count_quota(open, rates, hash, max_queued, rpm, tpm, tokens, now, ttl)
  if max_queued then
    redis.call('ZADD', open, now + ttl, hash)
    redis.call('HSET', hash, 'open', open)
  end
  local until_s = 0
  for _, q in ipairs({{'rpm', rpm, 1}, {'tpm', tpm, tokens}}) do
    if q[2] then
      local tat = tat_after(rates, q[1], q[2], q[3], now)
      redis.call('HSET', rates, q[1], tostring(tat))
      until_s = math.max(until_s, tat - now)
    end
  end
  if until_s > 0 then redis.call('EXPIRE', rates, math.ceil(until_s) + 1) end
end

--@include status
--@include inflight
local hash_ttl, idem_ttl, m, direct_at = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local paused, active = KEYS[#KEYS - 1], KEYS[#KEYS]

-- Admit the lone message now, if nothing waits anywhere and a slot is free for it.
local function admit_at_once(payload, id, level)
  if redis.call('HEXISTS', paused, level) == 1 or redis.call('HEXISTS', paused, '*') == 1 then return false end
  local d = 5 + 12 * m
  local exp, cap, n, own = ARGV[d], tonumber(ARGV[d + 1]), tonumber(ARGV[d + 2]), tonumber(ARGV[d + 3])
  local window = tonumber(ARGV[d + 4])
  local function level_arg(j, k) return ARGV[d + 5 + 4 * (j - 1) + k] end
  -- the slots a level keeps: its reserved ones, while it had a message within the window
  local function kept(j)
    local last = window > 0 and tonumber(redis.call('HGET', active, level_arg(j, 3)))
    if window > 0 and not (last and tonumber(direct_at) - last <= window) then return 0 end
    return tonumber(level_arg(j, 1))
  end
  for j = 1, n do
    if waiting(KEYS[6 * m + j]) > 0 then return false end
  end
  local held, total = inflight_counts(6 * m + n + 1, n, direct_at)
  if held[own] >= tonumber(level_arg(own, 0)) then return false end
  local floor = 0
  for j = 1, n do
    if tonumber(level_arg(j, 2)) < tonumber(level_arg(own, 2)) then floor = floor + math.max(0, kept(j) - held[j]) end
  end
  if total >= cap - floor then return false end
  inflight_hold(KEYS[6 * m + n + own], id, exp)
  redis.call('XADD', KEYS[6 * m + 2 * n + 1], '*', M, payload)
  return true
end

local depths, lefts, out, latest = {}, {}, {}, {}
for i = 1, m do
  local stream, hash, idem, legacy = KEYS[6 * i - 5], KEYS[6 * i - 4], KEYS[6 * i - 3], KEYS[6 * i - 2]
  local open, rates = KEYS[6 * i - 1], KEYS[6 * i]
  local a = 5 + 12 * (i - 1)
  local payload, id, level, enqueued, max_depth, digest, streamed =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 5], ARGV[a + 6]
  local max_queued, rpm, tpm, tokens = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9]),
    tonumber(ARGV[a + 10])
  local capped = ARGV[a + 11] == '1'
  local first = digest ~= '' and (redis.call('GET', idem) or (legacy ~= idem and redis.call('GET', legacy)))
  if redis.call('EXISTS', hash) == 1 then
    out[i] = {'queued', id, -1}
  elseif first then
    local sep = string.find(first, ' ', 1, true)
    local first_id = sep and string.sub(first, 1, sep - 1) or first
    if sep and string.sub(first, sep + 1) ~= digest then
      out[i] = {'conflict', first_id}
    else
      out[i] = {'duplicate', first_id}
    end
  else
    if not depths[stream] then depths[stream], lefts[stream] = waiting(stream) end
    local depth = depths[stream]
    local quota = depth < max_depth and over_quota(open, rates, max_queued, rpm, tpm, tokens, tonumber(enqueued))
    if depth >= max_depth then
      out[i] = {'full', depth}
    elseif quota then
      out[i] = {'limited', quota[1], quota[2], quota[3], quota[4]}
    elseif direct_at ~= '' and m == 1 and not capped and admit_at_once(payload, id, level) then
      if digest ~= '' then redis.call('SET', idem, id .. ' ' .. digest, 'EX', idem_ttl) end
      status_queued(hash, level, enqueued, hash_ttl, streamed)
      status_scheduled(hash, direct_at)
      count_quota(open, rates, hash, max_queued, rpm, tpm, tokens, tonumber(enqueued), hash_ttl)
      out[i] = {'queued', id, 0, 1}
    else
      if digest ~= '' then redis.call('SET', idem, id .. ' ' .. digest, 'EX', idem_ttl) end
      redis.call('XADD', stream, '*', M, payload)
      status_queued(hash, level, enqueued, hash_ttl, streamed, depth, lefts[stream])
      count_quota(open, rates, hash, max_queued, rpm, tpm, tokens, tonumber(enqueued), hash_ttl)
      out[i] = {'queued', id, depth}
      depth = depth + 1
    end
    depths[stream] = depth
    latest[level] = enqueued
  end
end
for level, at in pairs(latest) do redis.call('HSET', active, level, at) end
return out
