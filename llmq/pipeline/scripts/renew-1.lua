--[[ renew: reset the idle time of entries this consumer still owns, so no reclaimer takes them over
while their work runs.

KEYS[1]    the stream
ARGV[1]    the consumer group          ARGV[2]  this consumer          ARGV[3..]  entry ids
Returns the ids not renewed because another consumer owns them now (or they are no longer pending).
]]
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
