--[[
usage_list.lua: the first live conversations of one user, by character id.

KEYS[1]  the user's index: a sorted set of character id -> the time (ms,
         Redis's clock) the conversation's counters expire.
KEYS[2]  the same character ids, all scored 0, so in byte order.
         Both keys share the user's hash tag (one Cluster slot).

ARGV[1]  max     how many ids to return at most (>= 1)
ARGV[2]  offset  how many to skip first (>= 0): the store asks again past
                 ids whose counters were gone

Returns up to `max` character ids in byte order, from the offset-th on,
whose index entries have not expired.

Semantics: entries with score <= now_ms (Redis's TIME) leave both sets.
Should the two sets not hold the same number of ids then (written by a
release before the second set existed, or one set lost to eviction), the
second is rebuilt from the first. Ranks offset to offset + max - 1 of
the second are returned. The conversations' counters are then read by the store in a
pipeline of HGETALL + PTTL, on keys built in Rust by crate::keys (a second
round trip; ListUsage is not on the hot path, and this keeps every key
computed in one place and passed as a key, never built inside Lua). A
conversation whose hash expired in between is skipped.

Bounded work: O(log n + max) in the user's live conversations n, plus the
removal of the ones that expired since, each removed once (see
usage_increment.lua), plus a rebuild of O(n) only when the sets disagree,
which usage_increment.lua never causes. A user with 20,000 conversations
costs a call no more than one with 1,000.

Worked example: index {luna: now_ms + 5000, mars: now_ms - 1, ares: now_ms +
9000}, max 1, offset 0: mars leaves both sets and {"ares"} is returned;
with offset 1, {"luna"}.
]]

assert(#KEYS == 2, 'usage_list.lua: expected 2 KEYS (index, by id), got ' .. #KEYS)
assert(#ARGV == 2, 'usage_list.lua: expected 2 ARGV (max, offset), got ' .. #ARGV)
local index_key, by_id_key = KEYS[1], KEYS[2]
local max = tonumber(ARGV[1])
local offset = tonumber(ARGV[2])
assert(max and max >= 1 and max == math.floor(max), 'usage_list.lua: max must be a positive integer')
assert(offset and offset >= 0 and offset == math.floor(offset), 'usage_list.lua: offset must be a non-negative integer')

-- ZREM takes many members at once; Lua's unpack is limited to a few
-- thousand values, so they go in slices.
local function remove_all(key, members)
  for i = 1, #members, 1000 do
    redis.call('ZREM', key, unpack(members, i, math.min(i + 999, #members)))
  end
end

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', index_key, '-inf', string.format('%d', now_ms))
remove_all(by_id_key, expired)
redis.call('ZREMRANGEBYSCORE', index_key, '-inf', string.format('%d', now_ms))

if redis.call('ZCARD', by_id_key) ~= redis.call('ZCARD', index_key) then
  redis.call('DEL', by_id_key)
  local live = redis.call('ZRANGE', index_key, 0, -1)
  for i = 1, #live, 1000 do
    local batch = {}
    for j = i, math.min(i + 999, #live) do
      batch[#batch + 1] = 0
      batch[#batch + 1] = live[j]
    end
    redis.call('ZADD', by_id_key, unpack(batch))
  end
  local ttl = redis.call('PTTL', index_key)
  if ttl > 0 then
    redis.call('PEXPIRE', by_id_key, ttl)
  end
end

return redis.call('ZRANGE', by_id_key, offset, offset + max - 1)
