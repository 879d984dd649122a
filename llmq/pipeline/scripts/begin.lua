--[[ begin: a dispatcher begins a batch of calls in one round trip. Per message: skip it when this consumer
no longer owns its entry (another took it over: it must not be called from here; checked when asked, as
for a batch held long enough that its lease may have lapsed) or when it has ended (cancelled included);
else mark it dispatching and take a slot on the first of its backends below their limits.

KEYS[1]         the dispatch stream
KEYS[2..n+1]    the status hashes of the batch's n messages
KEYS[n+2..2n+1] their events streams
KEYS[2n+2..]    (slots, rpm counter, tpm counter) of each of b backends
ARGV[1]  now    ARGV[2]  the slot lease expiry    ARGV[3]  n    ARGV[4]  b
ARGV[5]  the consumer group                       ARGV[6]  this consumer ('' not to check ownership)
ARGV[7..]       (max_concurrent, rpm, tpm) per backend, then per message: its id, its entry id, its token
                estimate, whether it streams (1 or 0), k, and k backend numbers (1-based) in order of preference
Returns per message three values: the status it had ('' for none, 'lost' when its entry is not this
consumer's), the number of the backend whose slot it holds (positive when taken now, counted in this
minute's rpm and tpm; negative when held already; 0 for none), and 1 when it streams and its events stream
holds entries already (an earlier attempt's, or a replayed message's ended stream), else 0: only then need
the dispatcher read it before calling.
]]
--@include acquire
--@include status
local stream = KEYS[1]
local now, exp, n, b = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local group, consumer = ARGV[5], ARGV[6]
local out, a = {}, 7 + 3 * b
for i = 1, n do
  local hash = KEYS[1 + i]
  local id, entry, est, streams, k = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  local status = status_of(hash)
  local took, earlier = 0, 0
  local p = consumer ~= '' and redis.call('XPENDING', stream, group, entry, entry, 1)
  if p and not (p[1] and p[1][2] == consumer) then
    status = 'lost'
  elseif not ENDED[status] then
    status_dispatching(hash, now)
    if streams == '1' then earlier = redis.call('EXISTS', KEYS[1 + n + i]) end
    for q = 1, k do
      local j = tonumber(ARGV[a + 4 + q])
      local kb, ab = 1 + 2 * n + 3 * (j - 1), 6 + 3 * (j - 1)
      local got = acquire(KEYS[kb + 1], KEYS[kb + 2], KEYS[kb + 3], now, exp, id, tonumber(ARGV[ab + 1]),
                          tonumber(ARGV[ab + 2]), tonumber(ARGV[ab + 3]), est)
      if got > 0 then
        took = got == 1 and j or -j
        break
      end
    end
  end
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = status or '', took, earlier
  a = a + 5 + k
end
return out
