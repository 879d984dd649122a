--[[ dlq_index: index dead letters by message id, each only over an older entry (a message's newest dead
letter wins, whichever order the calls come in: one written meanwhile is newer than what a scan finds).

KEYS[1]    the dead-letter index (message id -> entry id)
ARGV[1..]  per dead letter: message id, entry id
Returns the number of index entries written.
]]
local function older(a, b)  -- stream ids "ms-seq": a before b
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end
local n = 0
for i = 1, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if not current or older(current, ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    n = n + 1
  end
end
return n
