--[[
limit_reset.lua: clear one subject's rate-limit counters of one rule, and
any block, and announce it to every tollgate instance.

KEYS[1]  the sliding log of the rule (see sliding_log.lua)
KEYS[2]  the sliding counter of the rule (see sliding_counter.lua): both
         are cleared, since an operator may have switched the algorithm
KEYS[3]  the block key
         All three share the subject's hash tag (one Cluster slot).

ARGV[1]  channel  the pub/sub channel every instance listens on
ARGV[2]  message  what the instances must forget ("limit:<rule>:<subject>";
                  its layout is the Rust side's business)

Returns the number of keys that existed (0 to 3): 0 means there was
nothing to clear.

Semantics: DEL of the three keys, then PUBLISH of the message, in one
atomic step: no instance can count a hit between the two, and the
announcement is made exactly when the counters are gone. On a Redis
Cluster, PUBLISH reaches the subscribers of every node.

Worked example: a blocked subject of `auth` holds {..}:auth:calls and
{..}:auth:block: the call returns 2, and the instances hear the message.

Bounded work: three DELs (the log's is O(n) in its calls, at most the
rule's limit) and one PUBLISH.
]]

assert(#KEYS == 3, 'limit_reset.lua: expected 3 KEYS (log, counter, block), got ' .. #KEYS)
assert(#ARGV == 2, 'limit_reset.lua: expected 2 ARGV (channel, message), got ' .. #ARGV)
local existed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return existed
