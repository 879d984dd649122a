--[[ dlq_trim: keep the dead-letter stream bounded: drop its oldest entries while it is longer than its
maximum length or they are older than its maximum age, and their index entries.

KEYS[1]  the dead-letter stream
KEYS[2]  the dead-letter index (message id -> entry id)
ARGV[1]  the oldest entry id kept by age (milliseconds part; entries below it go)
ARGV[2]  the maximum length
ARGV[3]  the most entries dropped by this call
Returns the number of entries dropped.
]]
local dlq, index = KEYS[1], KEYS[2]
local min_ms, max_len, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local excess = redis.call('XLEN', dlq) - max_len
local dropped = 0
for _, row in ipairs(redis.call('XRANGE', dlq, '-', '+', 'COUNT', limit)) do
  local id = row[1]
  local ms = tonumber(string.match(id, '^(%d+)'))
  if excess <= 0 and ms >= min_ms then break end
  local fields = row[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'message_id' and redis.call('HGET', index, fields[j + 1]) == id then
      redis.call('HDEL', index, fields[j + 1])
    end
  end
  redis.call('XDEL', dlq, id)
  excess, dropped = excess - 1, dropped + 1
end
return dropped
