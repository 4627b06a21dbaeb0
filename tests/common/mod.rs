pub mod binary;
pub mod certs;
pub mod cluster;
pub mod ratelimit_headers;
pub mod redis_server;
pub mod server;
