--[[ forget: remove a dead consumer from its group, only while it has nothing pending and no name lease.
Checked here, atomically: XGROUP DELCONSUMER drops the consumer's pending entries with it, so a consumer
that restarted under its name and read an entry between a check and the delete would lose that entry.

KEYS[1]  the stream
KEYS[2]  the consumer's name lease
ARGV[1]  the group
ARGV[2]  the consumer
Returns 1 when removed, else 0.
]]
local stream, lease, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('EXISTS', lease) == 1 then return 0 end
if #redis.call('XPENDING', stream, group, '-', '+', 1, consumer) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
return 1
