--[[ lease_release: give a consumer name lease up, only if this process holds it.

KEYS[1]  the name lease
ARGV[1]  this process's token
Returns 1 when released, 0 when the lease is another process's or gone.
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
