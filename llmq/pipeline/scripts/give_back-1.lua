--[[ give_back: a consumer stopping cleanly hands back entries it never handled (waiting for admission, for
a backend slot, for PostgreSQL): their last delivery is not counted, so rolling restarts during a backlog
never make poison of what waited through them. Only entries it still owns, and only while their count is
the one it read them with: a call resent after a lost reply undoes nothing more.

KEYS[1]    the stream
ARGV[1]    the group
ARGV[2]    the consumer
ARGV[3..]  per entry: its id, the delivery count it was read with
Returns the number of entries handed back.
]]
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV, 2 do
  local id, seen = ARGV[i], tonumber(ARGV[i + 1])
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == consumer and p[1][4] == seen then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID', 'RETRYCOUNT', math.max(0, seen - 1))
    n = n + 1
  end
end
return n
