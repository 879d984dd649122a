--[[ move_due: put messages whose retry backoff is over back into their level stream.

A message of a level that is no longer configured goes back to the retry stream instead, where the retry
stage ends it dead with that reason (it is never dropped silently). A cancelled message moves too and
keeps its status: the scheduler records it cancelled. Each member is removed as it moves, so a run sent
again after its reply was lost moves nothing twice.

KEYS[1]    the due set (member "<level>:<message id>", scored by due time)
KEYS[2]    the payloads hash (member -> message)
KEYS[3]    the retry stream
KEYS[4..]  one stream per configured level, in the order of their names in ARGV[4..]
ARGV[1]    now (Unix seconds)
ARGV[2]    the most messages to move
ARGV[3]    the status-hash key prefix (same hash tag: the same cluster slot)
ARGV[4..]  the configured level names
Returns the number of messages moved.
]]
--@include status
local due, payloads, retry = KEYS[1], KEYS[2], KEYS[3]
local members = redis.call('ZRANGEBYSCORE', due, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local streams = {}
for i = 4, #ARGV do streams[ARGV[i]] = KEYS[i] end
local moved = 0
for _, member in ipairs(members) do
  local sep = string.find(member, ':', 1, true)
  local level, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  local payload = redis.call('HGET', payloads, member)
  if payload then
    local stream = streams[level]
    if stream then
      redis.call('XADD', stream, '*', M, payload)
      status_requeued(ARGV[3] .. id)
    else
      redis.call('XADD', retry, '*', M, payload)
    end
    moved = moved + 1
  end
  redis.call('ZREM', due, member)
  redis.call('HDEL', payloads, member)
end
return moved
