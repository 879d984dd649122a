--[[ admit: hand waiting messages of one level to the dispatch stream, in order, while the limits allow.

Each candidate is acked in its level stream first, and handed off only if that XACK acked it: a run sent
again after its reply was lost, or a candidate another scheduler already admitted, is never admitted twice.
A candidate whose message has ended (cancelled) is left pending for its intake to record; one that another
live copy of the message has already moved past queued is acked and dropped. Each admission moves its
tenant's virtual time in the level (llmq/stages/schedule/fair.py): from the later of the tenant's and the
level's, on by the candidate's cost; the level's becomes that start. A candidate whose tenant has its
max_in_flight admitted already ends the run unexamined: it waits, and the next round orders without it.

KEYS[1..n]      the in-flight sets of every level
KEYS[n+1]       this level's in-flight set
KEYS[n+2]       the dispatch stream
KEYS[n+3]       this level's stream
KEYS[n+4]       the stagger key: no staggered admission before the time it holds
KEYS[n+5]       this level's virtual time
KEYS[n+6..]     per candidate, in order: its status hash, its tenant's virtual time in this level, its
                tenant's running messages (counted when it has a max_in_flight)
ARGV[1]  now (Unix seconds)          ARGV[2]  lease expiry of an admitted message's in-flight slot
ARGV[3]  the consumer group          ARGV[4]  this level's max_concurrent
ARGV[5]  the capacity of the backends (every level's slots)
ARGV[6]  slots reserved for higher levels and unused by them (this level may not take them)
ARGV[7]  n, the number of levels     ARGV[8]  the stagger interval in seconds (0: none)
ARGV[9]  how long a tenant's virtual time is kept, in seconds
ARGV[10] how long a message may be unended (a running set's older members are stale)
ARGV[11..] per candidate: message id, entry id, payload, cost (estimated tokens / its tenant's weight), its
         tenant's max_in_flight ('' for none)
Returns one code per candidate examined, in order (candidates after the limits were reached are not):
1 admitted, -1 not pending or not queued (acked, nothing handed off), or the status of a message that
has ended already (left pending).
A staggered run admits one candidate, and none before the stagger key's time.
]]
--@include status
--@include inflight
local now, exp, group = ARGV[1], ARGV[2], ARGV[3]
local lmax, cap, floor, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local gap, vt_ttl = tonumber(ARGV[8]), ARGV[9]
local inflight, dispatch, level, stagger, level_vt = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4], KEYS[n + 5]
local out = {}
if gap > 0 and tonumber(now) < tonumber(redis.call('GET', stagger) or '0') then return out end
local _, total = inflight_counts(1, n, now)
local mine = redis.call('ZCARD', inflight)  -- counted (and its expired leases dropped) above
local stale_after = tonumber(ARGV[10])
local admitted, a, m = 0, 11, n + 6
while a <= #ARGV do
  if mine >= lmax or total >= cap - floor or (gap > 0 and admitted > 0) then break end
  if ARGV[a + 4] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[m + 2], '-inf', tonumber(now) - stale_after)
    if redis.call('ZCARD', KEYS[m + 2]) >= tonumber(ARGV[a + 4]) then break end
  end
  local status = status_of(KEYS[m])
  if ENDED[status] then
    out[#out + 1] = status
  elseif redis.call('XACK', level, group, ARGV[a + 1]) == 0 or (status and status ~= QUEUED) then
    out[#out + 1] = -1
  else
    inflight_hold(inflight, ARGV[a], exp)
    redis.call('XADD', dispatch, '*', M, ARGV[a + 2])
    -- counted by its tenant's running set, named here (a replayed message's hash may be new, its tenant
    -- capped since it was queued)
    if ARGV[a + 4] ~= '' then redis.call('HSET', KEYS[m], 'running', KEYS[m + 2]) end
    status_scheduled(KEYS[m], now)
    local lvt = tonumber(redis.call('GET', level_vt)) or 0
    local start = math.max(tonumber(redis.call('GET', KEYS[m + 1])) or 0, lvt)
    redis.call('SET', KEYS[m + 1], tostring(start + tonumber(ARGV[a + 3])), 'EX', vt_ttl)
    if start > lvt then redis.call('SET', level_vt, tostring(start)) end
    mine, total, admitted = mine + 1, total + 1, admitted + 1
    out[#out + 1] = 1
  end
  a, m = a + 5, m + 3
end
if gap > 0 and admitted > 0 then
  redis.call('SET', stagger, tostring(tonumber(now) + gap), 'PX', math.ceil(gap * 1000))
end
return out
