--[[ give_back: a consumer stopping cleanly hands back entries it never handled (waiting for admission, for
a backend slot, for PostgreSQL): their last delivery is not counted, so rolling restarts during a backlog
never make poison of what waited through them. Only entries it still owns.

KEYS[1]    the stream
ARGV[1]    the group
ARGV[2]    the consumer
ARGV[3..]  entry ids
Returns the number of entries handed back.
]]
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID', 'RETRYCOUNT', math.max(0, p[1][4] - 1))
    n = n + 1
  end
end
return n
