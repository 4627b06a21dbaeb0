--[[
usage_settle.lua: pay after use on a usage quota: the messages counted with
a request id (by lua/usage_increment.lua) now count `actual`.

KEYS[1]  the conversation: a hash of message kind -> count
KEYS[2]  the request's record, as usage_increment.lua wrote it: "<allowed>
         <used> <resets_after_ms> <amount>", expiring with the conversation.
         Both keys share the user's hash tag.

ARGV[1]  kind    the message kind (a hash field)
ARGV[2]  actual  what the call counts from now on (>= 0)

Returns {found, used}: found is 0 or 1; used is the kind's count after the
settle (0 when not found).

Semantics (the memory store implements the same; keep them in step):
- Not found, and nothing written, when the record is gone (unknown id, or
  the conversation's counters reset), records a denial, or the
  conversation is gone.
- d = actual - the record's amount (the figure last settled, or counted);
  the kind's count moves by d and never below 0, whatever the quota: more
  than the quota leaves used over the limit and later messages denied
  until the conversation resets. The record's amount becomes `actual`
  (KEEPTTL), so settling twice applies the last figure.

Worked example: a call of amount 5 counted with id "r", used 7 after it.
Settled to 2: used 4, {1, 4}; settled to 2 again: {1, 4}; settled to 0:
{1, 2}.

Bounded work: O(1): one GET, one EXISTS, one HGET, one HSET, one SET.
]]

assert(#KEYS == 2, 'usage_settle.lua: expected 2 KEYS (conversation, record), got ' .. #KEYS)
assert(#ARGV == 2, 'usage_settle.lua: expected 2 ARGV (kind, actual), got ' .. #ARGV)
local conversation_key, record_key = KEYS[1], KEYS[2]
local kind = ARGV[1]
local actual = tonumber(ARGV[2])
assert(actual and actual >= 0 and actual == math.floor(actual), 'usage_settle.lua: actual must be a non-negative integer')

local function int(x)
  return string.format('%d', x)
end

local seen = redis.call('GET', record_key)
if not seen then
  return {0, 0}
end
local allowed, head, settled = string.match(seen, '^(%d+) (%d+ %d+) (%d+)$')
assert(allowed, 'usage_settle.lua: unexpected record in ' .. record_key)
if allowed ~= '1' or redis.call('EXISTS', conversation_key) == 0 then
  return {0, 0}
end

local used = tonumber(redis.call('HGET', conversation_key, kind)) or 0
local d = actual - tonumber(settled)
if d ~= 0 then
  used = math.max(used + d, 0)
  redis.call('HSET', conversation_key, kind, int(used))
  redis.call('SET', record_key, allowed .. ' ' .. head .. ' ' .. int(actual), 'KEEPTTL')
end
return {1, used}
