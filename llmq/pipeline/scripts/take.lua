--[[ take: claim pending entries of a consumer group that belong to one consumer: to re-read one's own
(after a restart or a failed batch) or to take over those of a consumer that died. Ownership is checked
here, atomically, so an entry another consumer took meanwhile is never taken back from it; taking over
from a dead consumer also checks that its name lease is still gone (it may have restarted under its name
and be re-reading them). Each entry taken counts one more delivery (XCLAIM without JUSTID), as a re-read
should for poison detection.

KEYS[1]    the stream
KEYS[2]    (taking over only) the name lease of the consumer they belong to
ARGV[1]    the group
ARGV[2]    the consumer that takes them
ARGV[3]    the consumer they must belong to
ARGV[4..]  entry ids
Returns per entry taken: {id, its fields (field, value, ...), deliveries}. An entry trimmed from the stream
while pending is dropped from the group's pending list by XCLAIM and not returned.
]]
local stream, lease = KEYS[1], KEYS[2]
local group, taker, owner = ARGV[1], ARGV[2], ARGV[3]
local out = {}
if lease and redis.call('EXISTS', lease) == 1 then return out end
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == owner then
    local claimed = redis.call('XCLAIM', stream, group, taker, 0, id)
    if claimed[1] then out[#out + 1] = {id, claimed[1][2], p[1][4] + 1} end
  end
end
return out
