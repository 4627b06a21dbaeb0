//! The Redis store: counters shared by every tollgate instance, changed only
//! by the Lua scripts under `lua/`.

use std::{fmt, time::Duration};

use super::{
    ConversationCounters, LimitCheck, LimitDecision, Store, StoreError, UsageDecision,
    UsageIncrement,
};

/// How to reach Redis. `Debug` masks the password in the URL.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `rediss://` for TLS).
    pub url: String,
    /// Every key starts with this.
    pub key_prefix: String,
    /// Every store call is bounded by this.
    pub timeout: Duration,
    /// Connections in the pool.
    pub pool_size: u32,
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &crate::config::mask_url_password(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// Counters in Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {}

impl RedisStore {
    /// Connects to Redis and loads the scripts.
    pub async fn connect(_options: &RedisOptions) -> Result<Self, StoreError> {
        todo!()
    }
}

impl Store for RedisStore {
    async fn check_limit(&self, _check: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        todo!()
    }
    async fn increment_usage(&self, _increment: &UsageIncrement<'_>) -> Result<UsageDecision, StoreError> {
        todo!()
    }
    async fn get_usage(&self, _user_id: &str, _character_id: &str) -> Result<ConversationCounters, StoreError> {
        todo!()
    }
    async fn list_usage(&self, _user_id: &str, _max: usize) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
        todo!()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }
}
