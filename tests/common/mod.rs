/// Expands each `async fn case(backend: Backend)` of the calling file into
/// one test per store: memory, Redis and a Redis Cluster. The file needs
/// `Backend` and `StoreKind` in scope and `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Memory)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Redis)).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Cluster)).await;
                }
            )*
        }
    };
}

pub mod binary;
pub mod certs;
pub mod cluster;
pub mod property;
pub mod ratelimit_headers;
pub mod redis_server;
pub mod server;
