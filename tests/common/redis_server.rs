//! A real `redis-server` on a free loopback port, killed when dropped.
//!
//! Each test starts its own server, so tests never share keys and need no
//! FLUSHDB or serial execution.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tollgate::store::{
    StoreError,
    redis::{RedisOptions, RedisStore},
};

/// Connecting with `options`, whose URL holds the password `hunter2` and
/// names only nodes where nothing listens, fails as Unavailable within
/// `within`, naming `address` and never the password, neither in the error
/// nor in the options' Debug (as logged).
#[allow(dead_code)]
pub async fn assert_unreachable_and_masked(
    options: &RedisOptions,
    address: &str,
    within: Duration,
) {
    let start = Instant::now();
    let err = RedisStore::connect(options)
        .await
        .expect_err("nothing listens there");
    assert!(start.elapsed() < within, "took {:?}", start.elapsed());
    let StoreError::Unavailable(message) = &err else {
        panic!("{err:?}");
    };
    println!("{message}");
    assert!(message.contains(address), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!format!("{options:?}").contains("hunter2"));
}

/// A running `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Given to redis-server after the usual options (a later one wins).
    args: Vec<String>,
    /// Given to every redis-cli call, the start-up PING included.
    cli_args: Vec<String>,
}

#[allow(dead_code)]
impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// Starts `redis-server` with `args` after the usual options (a later
    /// option wins over an earlier one), giving `cli_args` to every
    /// `redis-cli` call, e.g. `start_with(&["--requirepass", "s3cret"],
    /// &["-a", "s3cret", "--no-auth-warning"])`.
    pub fn start_with(args: &[&str], cli_args: &[&str]) -> Self {
        Self::launch(free_port(), owned(args), owned(cli_args))
    }

    /// Starts `redis-server` serving TLS only, on [`port`](Self::port):
    /// `cert` and `key` (PEM) are its own and `ca` signed them; clients are
    /// not asked for certificates. `extra` goes after the other options.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path, extra: &[&str]) -> Self {
        Self::start_tls_with_clients(cert, key, ca, None, extra)
    }

    /// A TLS-only server; with `client` (a certificate and its key), one
    /// that wants every client's certificate, redis-cli presenting `client`.
    fn start_tls_with_clients(
        cert: &Path,
        key: &Path,
        ca: &Path,
        client: Option<(&Path, &Path)>,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let (port_text, cert, key, ca) = (
            port.to_string(),
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
        );
        let mut args = owned(&[
            "--port",
            "0",
            "--tls-port",
            &port_text,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if client.is_some() { "yes" } else { "no" },
        ]);
        args.extend(owned(extra));
        let mut cli_args = owned(&["--tls", "--cacert", &ca]);
        if let Some((client_cert, client_key)) = client {
            cli_args.extend(owned(&[
                "--cert",
                &client_cert.display().to_string(),
                "--key",
                &client_key.display().to_string(),
            ]));
        }
        Self::launch(port, args, cli_args)
    }

    /// [`start_tls`](Self::start_tls), but every client must present a
    /// certificate that `ca` signed (`tls-auth-clients yes`); redis-cli
    /// presents `client` (a certificate and its key).
    pub fn start_mutual_tls(
        cert: &Path,
        key: &Path,
        ca: &Path,
        client: (&Path, &Path),
        extra: &[&str],
    ) -> Self {
        Self::start_tls_with_clients(cert, key, ca, Some(client), extra)
    }

    fn launch(port: u16, args: Vec<String>, cli_args: Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for redis-server");
        let mut server = Self {
            port,
            dir,
            child: None,
            args,
            cli_args,
        };
        server.spawn();
        server
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `redis://` URL for the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing
    /// answers, as when Redis hangs rather than refuses.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT); queued commands then run.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} redis-server");
    }

    /// Kills the server and starts a fresh one on the same port: no data,
    /// no scripts loaded.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against the server and returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.path().display().to_string(),
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Up when it answers, if only to ask for a password the cli lacks.
        while !matches!(
            self.cli(&["PING"]).as_str(),
            "PONG" | "NOAUTH Authentication required."
        ) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|&arg| arg.to_owned()).collect()
}

fn redis_server_binary() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A loopback port that was free a moment ago. Another process could take it
/// before redis-server binds it; the start-up wait then fails loudly (and
/// cluster nodes retry on a fresh port).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
        let port = listener.local_addr().expect("bound address").port();
        drop(listener);
        // Tests run in parallel: a server another test just started may
        // already answer there. Pick again rather than fail.
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            return port;
        }
    }
    panic!("no free loopback port in 100 tries");
}
