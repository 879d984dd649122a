--[[ acquire (included, not run alone): take a slot of one backend for a member unless a limit is reached.

slots, rpm_key, tpm_key: the backend's slots (a sorted set scored by lease expiry) and this minute's rpm and
tpm counters; now, exp: now and the slot's lease expiry; member: the message id; max_concurrent, rpm, tpm:
the backend's limits (0: none); est: the call's token estimate (a call estimated past a whole minute's
budget counts all of it).
Returns 1 when taken now (and counted in this minute's rpm and tpm), 2 when the member held it already (its
lease renewed, nothing counted again), 0 at a limit.
]]
local function acquire(slots, rpm_key, tpm_key, now, exp, member, max_concurrent, rpm, tpm, est)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZSCORE', slots, member) then
    redis.call('ZADD', slots, exp, member)
    return 2
  end
  if tpm > 0 and est > tpm then est = tpm end
  if redis.call('ZCARD', slots) >= max_concurrent then return 0 end
  if rpm > 0 and tonumber(redis.call('GET', rpm_key) or '0') >= rpm then return 0 end
  if tpm > 0 and tonumber(redis.call('GET', tpm_key) or '0') + est > tpm then return 0 end
  redis.call('ZADD', slots, exp, member)
  if rpm > 0 then redis.call('INCR', rpm_key); redis.call('EXPIRE', rpm_key, 120) end
  if tpm > 0 then redis.call('INCRBY', tpm_key, est); redis.call('EXPIRE', tpm_key, 120) end
  return 1
end
