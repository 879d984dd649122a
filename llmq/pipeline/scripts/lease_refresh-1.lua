--[[ lease_refresh: extend a consumer name lease while this process still holds it.

KEYS[1]  the name lease
ARGV[1]  this process's token          ARGV[2]  the lease's new time to live (ms)
Returns 1 when extended, 0 when the lease is another process's or gone.
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
