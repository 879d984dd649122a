--[[ relay: append a streamed call's chunks to its message's events stream, for one writer only.

The first write of a call claims the stream: a marker entry (field 'w', the call's token) before its
chunks. A call whose token is not the marker's (a dispatcher paused past its lease while another took
the message over) or that comes after the stream's end is refused, so clients never see two generations
spliced together, nor a chunk after the end. A call whose message is to stop (its streaming client went
away, on a level with abort_on_disconnect: scripts/cancel-1.lua) is told so and writes nothing more.

KEYS[1]    the events stream       KEYS[2]  the message's status hash
ARGV[1]    the call's token        ARGV[2]  the stream's TTL in seconds     ARGV[3]  its bound (MAXLEN ~)
ARGV[4]    the marker's entry id (used when the stream is new)
ARGV[5]    the call's time to first chunk (ms, from when it was sent)   ARGV[6]  the call's backend
           (with the marker, into the status hash: first_token_ms and backend, for the dashboard's open streams)
ARGV[7..]  per chunk: its entry id, its field ('c' or 'u'), its data
Returns 1 when written (a chunk whose id is there already, resent after a lost reply, is skipped), 0 when
refused, 2 when the call is to stop.
]]
local stream, token, ttl, bound = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', KEYS[2], 'abort') == 1 then return 2 end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
if first then
  if first[2][1] ~= 'w' or first[2][2] ~= token then return 0 end
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if last[2][1] == 'end' then return 0 end
else
  redis.call('XADD', stream, ARGV[4], 'w', token)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'first_token_ms', ARGV[5], 'backend', ARGV[6])
  end
end
for i = 7, #ARGV, 3 do
  local ok, err = pcall(redis.call, 'XADD', stream, 'MAXLEN', '~', bound, ARGV[i], ARGV[i + 1], ARGV[i + 2])
  if not ok and not string.find(tostring(err.err or err), 'equal or smaller', 1, true) then error(err) end
end
redis.call('EXPIRE', stream, ttl)
return 1
