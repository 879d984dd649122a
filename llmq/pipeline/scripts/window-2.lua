--[[ window: a backend's adaptive concurrency window (max_concurrent: auto), shared by every dispatcher:
additive increase while it answers, multiplicative decrease when it says it is full (AIMD, as TCP Reno).

KEYS[1]  the backend's window hash (fields 'limit', 'cut_at')
KEYS[2]  the backend's slots (scripts/acquire_slot-3.lua), with the answered call's still in it
ARGV[1]  now                    ARGV[2]  'ok' (an answer) or 'full' (a capacity signal)
ARGV[3]  the window's minimum   ARGV[4]  its maximum (also where it starts)
ARGV[5]  when the call was sent ARGV[6]  the decrease factor (0 < beta < 1)
ARGV[7]  with 'full': how many calls too many the backend says it has (0: it does not say)
An answer adds 1/limit (one slot per window of answers), while the window is in use: with fewer calls in
flight than it allows (less one, this call's slot may be freed already), an answer says nothing of a larger
one, and a window grown while idle would overrun the backend at the next burst. A capacity signal multiplies
the limit by beta, once per window: only a call sent after the last cut cuts again, as the calls in flight at
a cut were sent under the larger window and their refusals say nothing new. A signal that says by how much
the backend is over (an engine's queue past its limit) cuts by that much when it is more than beta's cut. Returns the limit (a decimal
string).
]]
local key, now, kind = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local low, high, sent, beta = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local limit = tonumber(redis.call('HGET', key, 'limit')) or high
if kind == 'full' then
  local cut_at = tonumber(redis.call('HGET', key, 'cut_at')) or 0
  if sent >= cut_at then
    limit = math.min(limit * beta, limit - (tonumber(ARGV[7]) or 0))
    redis.call('HSET', key, 'cut_at', now)
  end
elseif redis.call('ZCOUNT', KEYS[2], now, '+inf') >= math.floor(limit) - 1 then
  limit = limit + 1 / limit
end
limit = math.max(low, math.min(high, limit))
redis.call('HSET', key, 'limit', tostring(limit))
return tostring(limit)
