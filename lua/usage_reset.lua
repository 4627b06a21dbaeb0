--[[
usage_reset.lua: delete the counters of some conversations of one user, and
name the next ones still listed, so that the caller can reset every
conversation of a user a bounded batch at a time.

KEYS[1]     the user's index: character id -> expiry time (ms), see
            usage_increment.lua
KEYS[2]     the same ids, all scored 0 (ListUsage's order)
KEYS[3..n]  the conversations to delete, one hash each
            All keys share the user's hash tag (one Cluster slot).

ARGV[1]     next  how many ids still in the index to return, 0 to 1000
ARGV[2..]   the character ids of KEYS[3..], in the same order (raw; only
            the keys are encoded)

Returns {deleted, id...}: deleted is how many of the conversations had live
counters (a hash that expired is not counted), followed by up to `next`
ids still in the index after the deletion, earliest to expire first.

Semantics: each conversation's hash is deleted and its id leaves both
indexes, so GetUsage shows it unused and ListUsage no longer lists it.
The caller passes the returned ids back (with their keys) until none come
back.

Worked example: index {mars: now_ms - 1, luna: now_ms + 5000}, luna's hash
live and mars's expired. With no conversation and next 100: {0, "mars",
"luna"} (mars expires first). Then with both and next 100: {1}, and both
indexes are empty.

Bounded work: at most 1000 conversations per call (asserted), each one
DEL and two O(log n) ZREMs, plus one ZRANGE of at most 1000 ids.
]]

assert(#ARGV >= 1, 'usage_reset.lua: expected ARGV (next, character ids...)')
assert(#KEYS == #ARGV + 1, 'usage_reset.lua: expected one KEY per character id after the two indexes, got ' .. #KEYS .. ' KEYS for ' .. (#ARGV - 1) .. ' ids')
local next_ids = tonumber(ARGV[1])
assert(next_ids and next_ids >= 0 and next_ids <= 1000 and next_ids == math.floor(next_ids), 'usage_reset.lua: next must be an integer from 0 to 1000')
assert(#KEYS - 2 <= 1000, 'usage_reset.lua: at most 1000 conversations per call')
local index_key, by_id_key = KEYS[1], KEYS[2]

local deleted = 0
for i = 3, #KEYS do
  local character_id = ARGV[i - 1]
  deleted = deleted + redis.call('DEL', KEYS[i])
  redis.call('ZREM', index_key, character_id)
  redis.call('ZREM', by_id_key, character_id)
end

local reply = {deleted}
if next_ids > 0 then
  local ids = redis.call('ZRANGE', index_key, 0, next_ids - 1)
  for i = 1, #ids do
    reply[#reply + 1] = ids[i]
  end
end
return reply
