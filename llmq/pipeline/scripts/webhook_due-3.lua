--[[ webhook_due: put webhook deliveries whose backoff is over back into the webhooks stream.

Each member is removed as it moves, in the same call, so two retry processes (or a call sent again after its
reply was lost) never move one delivery twice.

KEYS[1]  the due set (member: the delivery's id and attempt, scored by due time)
KEYS[2]  the payloads hash (member -> the delivery)
KEYS[3]  the webhooks stream
ARGV[1]  now (Unix seconds)
ARGV[2]  the most deliveries to move
Returns the number moved.
]]
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(members) do
  local payload = redis.call('HGET', KEYS[2], member)
  if payload then
    redis.call('XADD', KEYS[3], '*', M, payload)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
end
return moved
