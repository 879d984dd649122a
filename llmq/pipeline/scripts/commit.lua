--[[ commit: settle stream entries of one consumer group, each together with its effects, atomically.

An entry's effects run only when its XACK acks it. So a commit that runs again after its reply was lost
(redis-py sends it again on a new connection), or an entry that another consumer took over and settled
first, changes nothing a second time: one hand-off, one outcome, one dead letter per entry. Should an
effect fail (a key of another type where a stream belongs: two deployments on one prefix), the entry's
remaining effects are skipped and the entry goes to the dead-letter stream with the error: it is on
record, never acked and gone. Effects given with no entry run whenever the commit runs, so they must be
safe to repeat (freeing a backend slot).

KEYS[1]     the stream the entries were read from
KEYS[2]     the dead-letter stream
KEYS[3..]   every key an effect names; an effect refers to a key by its position in KEYS
ARGV[1]     the consumer group
ARGV[2]     the channel on which the ids of messages that reached a terminal status are announced
ARGV[3..]   records, one after another: an entry id ('' for none), the number of its effects, then per
            effect its name, the number of its keys, their positions in KEYS, the number of its
            arguments and the arguments
Returns, per record with an entry id, in order: 1 when this call acked it and ran its effects, 2 when an
effect failed and it was dead-lettered instead, 0 when it was not pending (settled already).
The status words, ENDED (the terminal ones) and M (the message field) are prepended: llmq/pipeline/lua.py.
]]
--@include status
--@include inflight
local stream, dlq, group, channel = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local finished = {}
local effects = {}

-- Each effect is called with the ARGV positions of its first key position (kp) and first argument (ap),
-- its number of arguments (na) and of keys (nk): it reads them from ARGV, so a commit builds no table per
-- effect.
local function key(i)
  return KEYS[tonumber(ARGV[i])]
end

local function args(ap, na)
  return unpack(ARGV, ap, ap + na - 1)
end

-- keys: stream. args: field, value, ...
function effects.xadd(kp, ap, na)
  redis.call('XADD', key(kp), '*', args(ap, na))
end

-- keys: hash. args: field, value, ...
function effects.hset(kp, ap, na)
  redis.call('HSET', key(kp), args(ap, na))
end

-- keys: list. args: value
function effects.rpush(kp, ap)
  redis.call('RPUSH', key(kp), ARGV[ap])
end

-- keys: sorted set. args: score, member
function effects.zadd(kp, ap)
  redis.call('ZADD', key(kp), ARGV[ap], ARGV[ap + 1])
end

-- keys: sorted set. args: member
function effects.zrem(kp, ap)
  redis.call('ZREM', key(kp), ARGV[ap])
end

-- keys: counter. args: increment, TTL in seconds
function effects.incrby(kp, ap)
  redis.call('INCRBY', key(kp), ARGV[ap])
  redis.call('EXPIRE', key(kp), ARGV[ap + 1])
end

-- args: channel, message
function effects.publish(kp, ap)
  redis.call('PUBLISH', ARGV[ap], ARGV[ap + 1])
end

-- A message waits for another attempt (see status_retrying).
-- keys: status hash. args: field, value, ...
function effects.retrying(kp, ap, na)
  status_retrying(key(kp), args(ap, na))
end

-- A message's in-flight slot is free.
-- keys: in-flight set. args: message id
function effects.release(kp, ap)
  inflight_release(key(kp), ARGV[ap])
end

-- A message reached a terminal status: its outcome to the done stream (for the archive), its status hash
-- (kept for the retention), its in-flight slot released, and its id announced once the commit ends. A
-- cancel acknowledged to its client wins over an end decided meanwhile (expired, dead): then the cancelled
-- outcome given goes to the archive instead, and the status stays cancelled.
-- A streamed message's events stream (a fourth key) gets the end event, and the retention TTL.
-- keys: done stream, status hash, in-flight set[, events stream]. args: message id, retention s, outcome
-- payload, the cancelled outcome's payload ('' when the message cannot have been cancelled), the end
-- event ('' when not streamed), field, value, ...
function effects.finish(kp, ap, na, nk)
  local hash = key(kp + 1)
  local cancelled = ARGV[ap + 3]
  local event = ARGV[ap + 4]
  if cancelled ~= '' and status_of(hash) == CANCELLED then
    redis.call('XADD', key(kp), '*', M, cancelled)
    status_cancel_kept(hash, ARGV[ap + 1])
    event = '{"status":"' .. CANCELLED .. '"}'
  else
    redis.call('XADD', key(kp), '*', M, ARGV[ap + 2])
    status_ended(hash, ARGV[ap + 1], args(ap + 5, na - 5))
  end
  if nk > 3 then
    redis.call('XADD', key(kp + 3), '*', 'end', event)
    redis.call('EXPIRE', key(kp + 3), ARGV[ap + 1])
  end
  inflight_release(key(kp + 2), ARGV[ap])
  finished[#finished + 1] = ARGV[ap]
end

-- A dead letter, indexed by its message's id ('' for none) so it is found without a scan.
-- keys: dead-letter stream, index hash. args: message id, field, value, ...
function effects.deadletter(kp, ap, na)
  local id = redis.call('XADD', key(kp), '*', args(ap + 1, na - 1))
  if ARGV[ap] ~= '' then redis.call('HSET', key(kp + 1), ARGV[ap], id) end
end

-- Shorten a status hash's TTL, never lengthen it, and give none to a hash that has none (a message that a
-- replay made live again).
-- keys: status hash[, events stream]. args: TTL in seconds
function effects.shorten(kp, ap, _, nk)
  status_shortened(key(kp), ARGV[ap])
  if nk > 1 then redis.call('EXPIRE', key(kp + 1), ARGV[ap], 'XX', 'LT') end
end

-- The entry whose effect failed, to the dead-letter stream with the error (it was acked already).
local function dead_letter(entry, err)
  local row = redis.call('XRANGE', stream, entry, entry)[1]
  local payload = ''
  if row then
    for j = 1, #row[2], 2 do
      if row[2][j] == M then payload = row[2][j + 1] end
    end
  end
  local reason = type(err) == 'table' and err.err or tostring(err)
  redis.call('XADD', dlq, '*', M, payload, 'reason', 'an effect of its commit failed: ' .. reason,
             'stream', stream, 'group', group, 'entry_id', entry)
end

local flags, i = {}, 3
while i <= #ARGV do
  local entry, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local live = entry == '' or redis.call('XACK', stream, group, entry) == 1
  local flag = live and 1 or 0
  for _ = 1, n do
    local name, nk = ARGV[i], tonumber(ARGV[i + 1])
    local na = tonumber(ARGV[i + 2 + nk])
    if live and flag == 1 then
      local ok, err = pcall(effects[name], i + 2, i + 3 + nk, na, nk)
      if not ok then
        if entry == '' then error(err) end
        dead_letter(entry, err)
        flag = 2
      end
    end
    i = i + 3 + nk + na
  end
  if entry ~= '' then flags[#flags + 1] = flag end
end
if #finished > 0 then redis.call('PUBLISH', channel, table.concat(finished, ' ')) end
return flags
