--[[ cancel: a client's cancel of a message that has not reached a backend, or (a streaming client gone)
the stop of its backend call.

KEYS[1]  the message's status hash
ARGV[1]  now (Unix seconds)
ARGV[2]  the channel on which the ids of messages that reached a terminal status are announced
ARGV[3]  '0': leave a message that has not reached a backend as it is (absent: cancel it)
ARGV[4]  '1': a message in a backend call is to stop it (its dispatcher sees the 'abort' field)
Returns the status after the call: cancelled when this call (or an earlier one) cancelled it, the status it
has when it is past cancelling (dispatching or ended), false when there is no such message.
]]
local hash, now, channel = KEYS[1], ARGV[1], ARGV[2]
local before, after = ARGV[3] ~= '0', ARGV[4] == '1'
--@include status
local s = redis.call('HGET', hash, 'status')
if not s then return false end
if before and (s == QUEUED or s == SCHEDULED or s == RETRYING) then
  status_cancelled(hash, now)
  redis.call('PUBLISH', channel, string.match(hash, '[^:]+$'))
  return CANCELLED
end
if after and s == DISPATCHING then status_abort(hash) end
return s
