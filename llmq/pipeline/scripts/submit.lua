--[[ submit: put n messages into their level streams, each decided on its own: idempotency, backpressure,
XADD and its status hash at once.

Safe to repeat: a message whose status hash exists already was queued by an earlier run of this call (its
reply was lost and redis-py sent it again), and is not queued twice. A level's depth is read once per call
(lag + pending of the schedule group, XINFO GROUPS) and counted up as the call queues messages in it. The
status hash keeps the depth before the message and how many of the level's entries had left it then
(entries-read - pending), so its position can be told later from how many have left since.

KEYS       per message: its level stream, its status hash, its idempotency record, and the record an
           earlier release kept for the same key (the same record again when none; see llmq/pipeline/submit.py).
           A message without an idempotency key names a record it never reads (keys share one hash tag).
ARGV[1]    status hash TTL in seconds      ARGV[2]  idempotency record TTL in seconds
ARGV[3..]  per message: payload, message id, level, enqueued_at, the level's max depth, the digest of
           the request ('' when it has no idempotency key), '1' when it is streamed ('' when not)
Returns per message one of: {'queued', id, depth before it (-1: queued by an earlier run)},
{'duplicate', first id}, {'conflict', first id} (the key came with another request), {'full', depth}.
]]
-- The level's depth, and the count of its entries that have left it (false when Redis cannot tell).
local function waiting(stream)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if ok then
    for _, g in ipairs(groups) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == SCHEDULE_GROUP and f['lag'] then
        local left = f['entries-read'] and tonumber(f['entries-read']) - tonumber(f['pending'])
        return tonumber(f['pending']) + tonumber(f['lag']), left
      end
    end
  end
  return redis.call('XLEN', stream), false
end

--@include status
local hash_ttl, idem_ttl = ARGV[1], ARGV[2]
local depths, lefts, out = {}, {}, {}
for i = 1, #KEYS / 4 do
  local stream, hash, idem, legacy = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local a = 3 + 7 * (i - 1)
  local payload, id, level, enqueued, max_depth, digest, streamed =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 5], ARGV[a + 6]
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
    if depth >= max_depth then
      out[i] = {'full', depth}
    else
      if digest ~= '' then redis.call('SET', idem, id .. ' ' .. digest, 'EX', idem_ttl) end
      redis.call('XADD', stream, '*', M, payload)
      status_queued(hash, level, enqueued, hash_ttl, streamed, depth, lefts[stream])
      out[i] = {'queued', id, depth}
      depth = depth + 1
    end
    depths[stream] = depth
  end
end
return out
