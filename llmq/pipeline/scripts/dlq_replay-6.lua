--[[ dlq_replay: put a dead letter back into the pipeline and delete it, at most once.

KEYS[1]  the dead-letter stream
KEYS[2]  the stream it goes back to (a level, or done for an outcome)
KEYS[3]  the message's status hash (unused when ARGV[3] is '')
KEYS[4]  the dead-letter index (message id -> entry id)
KEYS[5]  the message's events stream (unused when ARGV[3] is ''): a replayed message's life starts anew
KEYS[6]  its tenant's open messages (unused when ARGV[7] is '')
ARGV[1]  the dead letter's entry id
ARGV[2]  the payload to put back
ARGV[3]  the status to give the message ('' to leave its hash alone)
ARGV[4]  now (Unix seconds)
ARGV[5]  the message id ('' for none)
ARGV[6]  '1' when the message is streamed ('' when not)
ARGV[7]  when the replayed message stops counting as one of its tenant's open ones unended (Unix seconds),
         '' when its tenant has no max_queued
Returns 1 when replayed, 0 when it was replayed (or purged) already.
]]
--@include status
local dlq, target, hash, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entry, payload, status, now, message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if #redis.call('XRANGE', dlq, entry, entry) == 0 then return 0 end
redis.call('XDEL', dlq, entry)
if message ~= '' and redis.call('HGET', index, message) == entry then redis.call('HDEL', index, message) end
redis.call('XADD', target, '*', M, payload)
if status ~= '' then
  status_replayed(hash, status, now, ARGV[6])
  redis.call('DEL', KEYS[5])
  if ARGV[7] ~= '' then  -- open again: it counts toward its tenant's max_queued until it ends
    redis.call('HSET', hash, 'open', KEYS[6])
    redis.call('ZADD', KEYS[6], ARGV[7], hash)
  end
end
return 1
