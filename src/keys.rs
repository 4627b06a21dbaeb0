//! Every Redis key tollgate uses, built in one place by pure functions.
//!
//! Shape: `<prefix>{<scope>}:<suffix>`.
//! - The prefix comes first so operators can tell tollgate's keys apart.
//! - Every key that one script touches shares the `{...}` hash tag, so each
//!   script runs on a single Redis Cluster slot: rate-limit keys are tagged
//!   by subject alone, so that every rule of one subject shares a slot and
//!   several limits of one subject can be decided by one script; usage keys
//!   are tagged by user. Statistics keys are tagged by bucket, and by
//!   character for a character's figures, so that they spread over the
//!   masters of a cluster rather than heating one slot.
//! - Caller-controlled ids are [`encode`]d: the encoding is injective and
//!   never yields `:`, `{` or `}`, so no crafted id can reach another
//!   subject's counters or escape its hash tag. Rule and kind names come
//!   from the operator's config and are restricted to `[a-z0-9_-]`.

use crate::{rules::Algorithm, stats::Granularity};

/// Builds keys under one configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBuilder {
    prefix: String,
}

/// The keys of one (rule, subject) rate-limit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitKeys {
    /// The sliding log (a sorted set, one member per counted call) or
    /// sliding counter (a hash).
    pub counter: String,
    /// Present while the subject is locked out.
    pub block: String,
}

impl LimitKeys {
    /// The record of one request id of this counter: the first answer and
    /// what a settle needs. It extends the counter's key, so it shares its
    /// hash tag (one Cluster slot) and names the algorithm, and the
    /// request id is [`encode`]d, so no crafted id reaches another key.
    pub fn request(&self, request_id: &str) -> String {
        let mut key = String::with_capacity(self.counter.len() + request_id.len() + 4);
        key.push_str(&self.counter);
        key.push_str(":id:");
        encode_into(&mut key, request_id);
        key
    }
}

/// The keys of one user's usage quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageKeys {
    /// A sorted set of the user's live conversations: character id scored by
    /// the time (ms) its counters expire. It lets ListUsage find them without
    /// scanning the keyspace.
    pub index: String,
    /// The same conversations ordered by character id: a sorted set whose
    /// members all score 0, so Redis keeps them in byte order and ListUsage
    /// reads the first ones without reading them all.
    pub by_id: String,
    /// The hash tag and prefix shared by the user's conversation keys.
    conversation_stem: String,
}

impl UsageKeys {
    /// The hash of one conversation's counters, a field per message kind.
    pub fn conversation(&self, character_id: &str) -> String {
        let mut key = self.conversation_stem.clone();
        encode_into(&mut key, character_id);
        key
    }

    /// The record of one request id counting `kind` in one conversation:
    /// the conversation's key (whose encoded character id holds no `:`),
    /// the kind (config names are `[a-z0-9_-]`), then the encoded id.
    pub fn request(&self, character_id: &str, kind: &str, request_id: &str) -> String {
        let mut key = self.conversation(character_id);
        key.push(':');
        key.push_str(kind);
        key.push_str(":id:");
        encode_into(&mut key, request_id);
        key
    }
}

/// The keys of one statistics bucket, globally or for one character. All
/// of them share one hash tag, and the tag names the bucket (and the
/// character): on a Redis Cluster each bucket, and each character's figures
/// in it, land on their own slot, so a flush spreads over every master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsKeys {
    /// A hash: `m:<kind>` messages counted, `d:<kind>` calls denied.
    pub counts: String,
    /// A HyperLogLog of the users with a counted message.
    pub users: String,
    /// For the global figures only: a sorted set of character ids scored
    /// by their messages in the bucket.
    pub top: Option<String>,
}

impl KeyBuilder {
    /// A builder for keys under `prefix`, which must hold no `{` or `}`
    /// (the config validates this).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of `subject`'s counter for `rule`. The algorithm is part of
    /// the key so that switching a rule's algorithm never reads a counter of
    /// the other type.
    pub fn limit(&self, rule: &str, algorithm: Algorithm, subject: &str) -> LimitKeys {
        let mut stem = String::with_capacity(self.prefix.len() + rule.len() + subject.len() + 16);
        stem.push_str(&self.prefix);
        stem.push_str("{rl:");
        encode_into(&mut stem, subject);
        stem.push_str("}:");
        stem.push_str(rule);
        let suffix = match algorithm {
            // ":calls", not the ":log" of releases before one entry per
            // call: the layouts differ, so an old log is never misread.
            Algorithm::SlidingLog => ":calls",
            Algorithm::SlidingCounter => ":ctr",
        };
        // Two allocations per decision: the stem grows into the block key
        // (the capacity above has room for ":block") and a copy of it into
        // the counter key.
        let mut counter = String::with_capacity(stem.len() + suffix.len());
        counter.push_str(&stem);
        counter.push_str(suffix);
        stem.push_str(":block");
        LimitKeys {
            counter,
            block: stem,
        }
    }

    /// The keys of `subject`'s counters for `rule` under every algorithm,
    /// and its block key: what a reset clears.
    pub fn limit_all(&self, rule: &str, subject: &str) -> [String; 3] {
        let log = self.limit(rule, Algorithm::SlidingLog, subject);
        let counter = self.limit(rule, Algorithm::SlidingCounter, subject);
        [log.counter, counter.counter, log.block]
    }

    /// The pub/sub channel on which resets are announced to every instance
    /// that shares the prefix. A channel, not a key: it belongs to no slot.
    pub fn reset_channel(&self) -> String {
        format!("{}admin:resets", self.prefix)
    }

    /// The record of a CheckLimits group's answer under `request_id`, in
    /// the slot of its first check's `subject`. `}#` (never `}:`) follows
    /// the tag, so no rule's counter can share the key.
    pub fn group_request(&self, subject: &str, request_id: &str) -> String {
        let mut key =
            String::with_capacity(self.prefix.len() + subject.len() + request_id.len() + 16);
        key.push_str(&self.prefix);
        key.push_str("{rl:");
        encode_into(&mut key, subject);
        key.push_str("}#group:");
        encode_into(&mut key, request_id);
        key
    }

    /// The keys of `user_id`'s usage quotas.
    pub fn usage(&self, user_id: &str) -> UsageKeys {
        let mut tag = String::with_capacity(self.prefix.len() + user_id.len() + 11);
        tag.push_str(&self.prefix);
        tag.push_str("{uq:");
        encode_into(&mut tag, user_id);
        tag.push('}');
        let mut index = String::with_capacity(tag.len() + 6);
        index.push_str(&tag);
        index.push_str(":convs");
        let mut by_id = String::with_capacity(tag.len() + 4);
        by_id.push_str(&tag);
        by_id.push_str(":ids");
        tag.push_str(":c:");
        UsageKeys {
            index,
            by_id,
            conversation_stem: tag,
        }
    }
}

impl KeyBuilder {
    /// The keys of the `granularity` bucket starting at `start` (Unix
    /// seconds), for `character_id` or, with `None`, every character.
    pub fn stats(
        &self,
        granularity: Granularity,
        start: i64,
        character_id: Option<&str>,
    ) -> StatsKeys {
        let mut tag = String::with_capacity(self.prefix.len() + 32);
        tag.push_str(&self.prefix);
        tag.push_str("{st:");
        tag.push(granularity.code());
        tag.push(':');
        tag.push_str(&start.to_string());
        if let Some(id) = character_id {
            tag.push_str(":c:");
            encode_into(&mut tag, id);
        }
        tag.push('}');
        StatsKeys {
            counts: format!("{tag}:n"),
            users: format!("{tag}:u"),
            top: character_id.is_none().then(|| format!("{tag}:top")),
        }
    }
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// part between the first `{` and the next `}`, when not empty) or else of
/// the whole key, modulo 16384.
pub fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Percent-encodes every byte outside `[A-Za-z0-9._~@-]`, `%` included, so
/// the result is injective and holds no `:`, `{` or `}`. Readable ids (most
/// user ids, API keys, IPv4 addresses) stay readable in `redis-cli`.
pub fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    encode_into(&mut out, id);
    out
}

fn encode_into(out: &mut String, id: &str) {
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'~' | b'@' | b'-') {
            out.push(char::from(byte));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_keys_are_pinned() {
        let keys = KeyBuilder::new("aim:").limit("auth", Algorithm::SlidingLog, "user-42");
        assert_eq!(keys.counter, "aim:{rl:user-42}:auth:calls");
        assert_eq!(keys.block, "aim:{rl:user-42}:auth:block");
        let keys = KeyBuilder::new("aim:").limit("api", Algorithm::SlidingCounter, "10.0.0.1");
        assert_eq!(keys.counter, "aim:{rl:10.0.0.1}:api:ctr");
        assert_eq!(keys.request("r-1"), "aim:{rl:10.0.0.1}:api:ctr:id:r-1");
    }

    #[test]
    fn request_id_keys_are_pinned_and_encoded() {
        let keys = KeyBuilder::new("aim:").limit("auth", Algorithm::SlidingLog, "u");
        assert_eq!(keys.request("a:b}"), "aim:{rl:u}:auth:calls:id:a%3Ab%7D");
        let usage = KeyBuilder::new("aim:").usage("u1");
        assert_eq!(
            usage.request("luna", "text", "{x}"),
            "aim:{uq:u1}:c:luna:text:id:%7Bx%7D"
        );
        // A crafted character id cannot spell another conversation's record.
        assert_ne!(
            usage.request("luna:text:id:r", "text", "r"),
            usage.request("luna", "text", "r")
        );
    }

    #[test]
    fn reset_keys_and_channel_are_pinned() {
        let b = KeyBuilder::new("aim:");
        assert_eq!(
            b.limit_all("auth", "u1"),
            [
                "aim:{rl:u1}:auth:calls",
                "aim:{rl:u1}:auth:ctr",
                "aim:{rl:u1}:auth:block"
            ]
        );
        assert_eq!(b.reset_channel(), "aim:admin:resets");
    }

    #[test]
    fn group_request_keys_are_pinned() {
        let keys = KeyBuilder::new("aim:");
        assert_eq!(
            keys.group_request("user-42", "req:1"),
            "aim:{rl:user-42}#group:req%3A1"
        );
    }

    #[test]
    fn usage_keys_are_pinned() {
        let keys = KeyBuilder::new("aim:").usage("u1");
        assert_eq!(keys.index, "aim:{uq:u1}:convs");
        assert_eq!(keys.by_id, "aim:{uq:u1}:ids");
        assert_eq!(keys.conversation("luna"), "aim:{uq:u1}:c:luna");
    }

    #[test]
    fn cluster_slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(cluster_slot("foo"), 12182);
        assert_eq!(cluster_slot("123456789"), 0x31C3);
        assert_eq!(
            cluster_slot("{user1000}.following"),
            cluster_slot("user1000")
        );
        assert_eq!(cluster_slot("foo{}{bar}"), cluster_slot("foo{}{bar}"));
    }

    #[test]
    fn stats_keys_are_pinned() {
        let b = KeyBuilder::new("aim:");
        let global = b.stats(Granularity::Hour, 1_796_043_600, None);
        assert_eq!(global.counts, "aim:{st:h:1796043600}:n");
        assert_eq!(global.users, "aim:{st:h:1796043600}:u");
        assert_eq!(global.top.as_deref(), Some("aim:{st:h:1796043600}:top"));
        let luna = b.stats(Granularity::Week, 0, Some("lu:na"));
        assert_eq!(luna.counts, "aim:{st:w:0:c:lu%3Ana}:n");
        assert_eq!(luna.users, "aim:{st:w:0:c:lu%3Ana}:u");
        assert_eq!(luna.top, None);
    }

    #[test]
    fn separators_and_hash_tags_are_encoded() {
        assert_eq!(encode("a:b"), "a%3Ab");
        assert_eq!(encode("{x}"), "%7Bx%7D");
        assert_eq!(encode("100%"), "100%25");
        assert_eq!(encode("é"), "%C3%A9");
        let keys = KeyBuilder::new("p:").limit("api", Algorithm::SlidingLog, "x}:api:{rl:y");
        assert_eq!(keys.counter, "p:{rl:x%7D%3Aapi%3A%7Brl%3Ay}:api:calls");
    }

    #[test]
    fn crafted_ids_do_not_collide() {
        let b = KeyBuilder::new("p:");
        // A user id that tries to spell out another user's conversation key.
        let honest = b.usage("u1").conversation("c:d");
        let crafted = b.usage("u1}:c:c").conversation("d");
        assert_ne!(honest, crafted);
        // The percent sign itself is encoded, so encodings cannot be forged.
        assert_ne!(encode("a%3Ab"), encode("a:b"));
    }

    #[test]
    fn every_key_of_one_decision_shares_one_hash_tag() {
        fn tag(key: &str) -> &str {
            let open = key.find('{').expect("key has a hash tag");
            let close = key[open..].find('}').expect("hash tag is closed") + open;
            &key[open..=close]
        }
        let limit = KeyBuilder::new("p:").limit("auth", Algorithm::SlidingLog, "{evil}");
        assert_eq!(tag(&limit.counter), tag(&limit.block));
        assert_eq!(tag(&limit.counter), tag(&limit.request("{r}")));
        // Every rule of one subject shares the tag, so one script can
        // decide several of them.
        let other = KeyBuilder::new("p:").limit("api", Algorithm::SlidingCounter, "{evil}");
        assert_eq!(tag(&limit.counter), tag(&other.counter));
        let usage = KeyBuilder::new("p:").usage("{evil}");
        assert_eq!(tag(&usage.index), tag(&usage.conversation("{c}")));
        assert_eq!(tag(&usage.index), tag(&usage.request("{c}", "text", "{r}")));
    }
}
