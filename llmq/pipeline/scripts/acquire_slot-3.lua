--[[ acquire_slot: take a slot of one backend for a message unless a limit is reached (every dispatcher
shares the backend's limits through these keys).

KEYS[1]  the backend's slots      KEYS[2]  this minute's rpm counter      KEYS[3]  this minute's tpm counter
ARGV[1]  now (Unix seconds)       ARGV[2]  the slot's lease expiry        ARGV[3]  the message id
ARGV[4]  max_concurrent           ARGV[5]  rpm (0: none)                  ARGV[6]  tpm (0: none)
ARGV[7]  the call's token estimate
Returns 1 when taken now, 2 when held already (renewed, not counted again), 0 at a limit.
]]
--@include acquire
return acquire(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3],
               tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
