--[[
usage_list.lua: the live conversations of one user, from the user's index.

KEYS[1]  the user's index: a sorted set of character id -> the time (ms,
         Redis's clock) the conversation's counters expire.

ARGV     none.

Returns the character ids whose counters have not expired, in no particular
order (the store sorts them bytewise and keeps the first `max`, so the
lexicographically smallest ids are listed).

Semantics: entries with score <= now_ms (Redis's TIME) are removed, and the
rest are returned. The conversations' counters are then read by the store
in a pipeline of HGETALL + PTTL, on keys built in Rust by crate::keys (a
second round trip; ListUsage is not on the hot path, and this keeps every
key computed in one place and passed as a key, never built inside Lua). A
conversation whose hash expired in between is skipped.

Worked example: index {luna: now_ms + 5000, mars: now_ms - 1}: mars is
removed and {"luna"} is returned.
]]

assert(#KEYS == 1, 'usage_list.lua: expected 1 KEY (index), got ' .. #KEYS)
assert(#ARGV == 0, 'usage_list.lua: expected no ARGV, got ' .. #ARGV)

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now_ms))
return redis.call('ZRANGE', KEYS[1], 0, -1)
