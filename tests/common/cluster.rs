//! A real Redis Cluster on free loopback ports: three masters (and
//! optionally a replica each), created with `redis-cli --cluster create`,
//! every process killed when dropped. [`RedisCluster::start_tls`] starts one
//! whose nodes speak TLS only, to clients and on the cluster bus.
//!
//! Each test starts its own cluster, so tests share no keys. The helpers
//! speak to single nodes through `redis-cli`, as an operator would, to look
//! at where keys live and to move slots and fail masters over.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use super::{
    certs::{CertFiles, Pki},
    redis_server::free_port,
};

/// One `redis-server --cluster-enabled yes` process.
struct Node {
    port: u16,
    child: Child,
    // Holds nodes.conf; removed on drop, after the process is killed.
    _dir: tempfile::TempDir,
}

/// A running Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<Node>,
    /// Ports of the nodes [`RedisCluster::crash`] killed.
    crashed: Mutex<Vec<u16>>,
    /// Whether the nodes speak TLS only.
    tls: bool,
    /// The `default` user's password, if the nodes want one.
    password: Option<String>,
    /// Given to every redis-cli call: TLS and password options.
    cli_args: Vec<String>,
}

/// A node's role and slots, from `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's id.
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// For a replica, its master's id.
    pub master_id: Option<String>,
}

impl RedisCluster {
    /// Starts three masters, each with `replicas` replicas, and waits until
    /// every node reports `cluster_state:ok` and agrees on the slots.
    pub fn start(replicas: usize) -> Self {
        Self::launch(replicas, false, None, Vec::new(), Vec::new())
    }

    /// Starts three masters, each with `replicas` replicas, that speak TLS
    /// only: to clients (`--port 0`), on the cluster bus and between master
    /// and replica. Every node serves `pki.server` and trusts `pki.ca`;
    /// clients are not asked for certificates. With `password`, every node
    /// wants it for the `default` user, and the helpers give it.
    pub fn start_tls(pki: &Pki, replicas: usize, password: Option<&str>) -> Self {
        Self::start_tls_serving(pki, &pki.server, replicas, password)
    }

    /// [`start_tls`](Self::start_tls), but every node asks clients for a
    /// certificate that `pki.ca` signed (`tls-auth-clients yes`); the
    /// helpers' redis-cli presents `pki.client`.
    pub fn start_mutual_tls(pki: &Pki, replicas: usize, password: Option<&str>) -> Self {
        Self::start_tls_with(pki, &pki.server, replicas, password, true)
    }

    /// [`start_tls`](Self::start_tls), every node serving `server` instead
    /// of `pki.server`.
    pub fn start_tls_serving(
        pki: &Pki,
        server: &CertFiles,
        replicas: usize,
        password: Option<&str>,
    ) -> Self {
        Self::start_tls_with(pki, server, replicas, password, false)
    }

    fn start_tls_with(
        pki: &Pki,
        server: &CertFiles,
        replicas: usize,
        password: Option<&str>,
        client_certificates: bool,
    ) -> Self {
        let path = |path: &Path| path.display().to_string();
        let ca = path(&pki.ca);
        let mut server_args = owned(&[
            "--tls-cert-file",
            &path(&server.cert),
            "--tls-key-file",
            &path(&server.key),
            // The cluster bus always asks the dialling node for a
            // certificate, whatever tls-auth-clients says, and OpenSSL
            // refuses one made for server auth only (as pki.server is): a
            // node dials with pki.client, or the nodes never meet.
            "--tls-client-cert-file",
            &path(&pki.client.cert),
            "--tls-client-key-file",
            &path(&pki.client.key),
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if client_certificates { "yes" } else { "no" },
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ]);
        let mut cli_args = owned(&["--tls", "--cacert", &ca]);
        if client_certificates {
            cli_args.extend(owned(&[
                "--cert",
                &path(&pki.client.cert),
                "--key",
                &path(&pki.client.key),
            ]));
        }
        if let Some(password) = password {
            server_args.extend(owned(&[
                "--requirepass",
                password,
                "--masterauth",
                password,
            ]));
            cli_args.extend(owned(&["-a", password, "--no-auth-warning"]));
        }
        Self::launch(
            replicas,
            true,
            password.map(str::to_owned),
            server_args,
            cli_args,
        )
    }

    /// Starts the nodes with `server_args` after the usual options, creates
    /// the cluster and waits until it is stable.
    fn launch(
        replicas: usize,
        tls: bool,
        password: Option<String>,
        server_args: Vec<String>,
        cli_args: Vec<String>,
    ) -> Self {
        let count = 3 * (1 + replicas);
        let nodes: Vec<Node> = (0..count)
            .map(|_| Node::start(tls, &server_args, &cli_args))
            .collect();
        let cluster = Self {
            nodes,
            crashed: Mutex::new(Vec::new()),
            tls,
            password,
            cli_args,
        };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        // It waits for the nodes to meet on the cluster bus, forever if
        // they cannot (a TLS handshake they refuse, say).
        let output = output_within(
            Command::new("redis-cli")
                .args(&cluster.cli_args)
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]),
            Duration::from_secs(30),
        );
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.await_stable();
        cluster
    }

    /// A `redis-cluster://` URL naming every master as a seed node
    /// (`rediss-cluster://` for TLS, with the password if there is one).
    pub fn url(&self) -> String {
        let credentials = match &self.password {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        let scheme = if self.tls {
            "rediss-cluster"
        } else {
            "redis-cluster"
        };
        format!("{scheme}://{credentials}{}", self.seeds())
    }

    /// Every master as `127.0.0.1:port`, comma-separated: a URL's nodes.
    pub fn seeds(&self) -> String {
        let seeds: Vec<String> = self
            .masters()
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        seeds.join(",")
    }

    /// Runs `redis-cli` against the node on `port` and returns its trimmed
    /// output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, &self.cli_args, args)
    }

    /// An integer reply from the node on `port`.
    pub fn cli_int(&self, port: u16, args: &[&str]) -> i64 {
        let reply = self.cli(port, args);
        reply
            .parse()
            .unwrap_or_else(|_| panic!("{args:?} on :{port} answered {reply:?}, not an integer"))
    }

    /// Every node, as the node on `port` sees the cluster.
    pub fn nodes_seen_by(&self, port: u16) -> Vec<NodeInfo> {
        self.cli(port, &["CLUSTER", "NODES"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 8 || fields[2].contains("fail") {
                    return None;
                }
                // "127.0.0.1:7000@17000" (and, in newer versions, ",hostname").
                let address = fields[1].split(['@', ',']).next()?;
                let port = address.rsplit(':').next()?.parse().ok()?;
                Some(NodeInfo {
                    id: fields[0].to_owned(),
                    port,
                    master: fields[2].contains("master"),
                    master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                })
            })
            .collect()
    }

    /// The ports of the nodes that were not crashed.
    fn live_ports(&self) -> Vec<u16> {
        let crashed = self.crashed.lock().expect("no test panics holding it");
        self.nodes
            .iter()
            .map(|node| node.port)
            .filter(|port| !crashed.contains(port))
            .collect()
    }

    /// A node that was not crashed, to ask about the cluster.
    fn any_live_port(&self) -> u16 {
        self.live_ports()[0]
    }

    /// The current masters, as the first live node sees them, by port.
    pub fn masters(&self) -> Vec<NodeInfo> {
        let mut masters: Vec<NodeInfo> = self
            .nodes_seen_by(self.any_live_port())
            .into_iter()
            .filter(|node| node.master)
            .collect();
        masters.sort_by_key(|node| node.port);
        masters
    }

    /// The port of a replica of the master on `master`.
    pub fn replica_of(&self, master: u16) -> u16 {
        let master_id = self.node_id(master);
        self.nodes_seen_by(master)
            .into_iter()
            .find(|node| node.master_id.as_deref() == Some(master_id.as_str()))
            .unwrap_or_else(|| panic!("the master on :{master} has no replica"))
            .port
    }

    /// The node id of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"])
    }

    /// The slot of `key`.
    pub fn key_slot(&self, key: &str) -> u16 {
        let slot = self.cli_int(self.any_live_port(), &["CLUSTER", "KEYSLOT", key]);
        u16::try_from(slot).expect("slots are 0..16384")
    }

    /// The port of the master that owns `slot`, as the first live node sees
    /// it.
    pub fn owner_of(&self, slot: u16) -> u16 {
        let slots = self.slot_ranges(self.any_live_port());
        slots
            .iter()
            .find(|(range, _)| range.contains(&slot))
            .map(|(_, port)| *port)
            .unwrap_or_else(|| panic!("slot {slot} has no owner: {slots:?}"))
    }

    /// Slot ranges and their masters' ports as the node on `port` sees them.
    fn slot_ranges(&self, port: u16) -> Vec<(std::ops::RangeInclusive<u16>, u16)> {
        // `CLUSTER NODES` lists each master's slots after its 8th field.
        let mut ranges = Vec::new();
        for line in self.cli(port, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let Some(node_port) = fields[1]
                .split(['@', ','])
                .next()
                .and_then(|address| address.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            for range in &fields[8..] {
                // Skip open migrations, shown as "[slot->-id]" or "[slot-<-id]".
                if range.starts_with('[') {
                    continue;
                }
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(start), Ok(end)) = (start.parse(), end.parse()) {
                    ranges.push((start..=end, node_port));
                }
            }
        }
        ranges
    }

    /// How often the node on `port` answered each error code
    /// (`INFO errorstats`), e.g. `MOVED`, `ASK`, `TRYAGAIN`, `NOSCRIPT`.
    pub fn error_counts(&self, port: u16) -> BTreeMap<String, u64> {
        self.info_counts(port, "errorstats", "errorstat_")
    }

    /// How often the node on `port` ran each command (`INFO
    /// commandstats`), e.g. `eval`, `evalsha`.
    pub fn command_counts(&self, port: u16) -> BTreeMap<String, u64> {
        self.info_counts(port, "commandstats", "cmdstat_")
    }

    /// `<prefix><name>:calls=N,...` or `<prefix><name>:count=N` lines of
    /// an INFO section, as name -> N.
    fn info_counts(&self, port: u16, section: &str, prefix: &str) -> BTreeMap<String, u64> {
        self.cli(port, &["INFO", section])
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.trim().strip_prefix(prefix)?.split_once(':')?;
                let count = fields.split(',').next()?.split_once('=')?.1.parse().ok()?;
                Some((name.to_owned(), count))
            })
            .collect()
    }

    /// Moves `slot` from its owner to the master on `to`, keys and all, as
    /// `redis-cli --cluster reshard` does: IMPORTING on the target,
    /// MIGRATING on the source, MIGRATE the keys in batches, then
    /// `SETSLOT NODE` on the target, the source and every other master.
    /// `step` is called in each state ("migrating", "keys moved", "slot
    /// moved"); it may pause there so that requests hit that state.
    pub fn migrate_slot(&self, slot: u16, to: u16, mut step: impl FnMut(&str)) {
        let from = self.owner_of(slot);
        assert_ne!(from, to, "slot {slot} already lives on :{to}");
        let slot_arg = slot.to_string();
        let from_id = self.node_id(from);
        let to_id = self.node_id(to);
        let ok = |port: u16, args: &[&str]| {
            let reply = self.cli(port, args);
            assert_eq!(reply, "OK", "{args:?} on :{port}");
        };
        ok(
            to,
            &[
                "CLUSTER",
                "SETSLOT",
                &slot_arg,
                "IMPORTING",
                from_id.as_str(),
            ],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", to_id.as_str()],
        );
        step("migrating");
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(from, &args);
        }
        step("keys moved");
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "NODE", to_id.as_str()],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "NODE", to_id.as_str()],
        );
        step("slot moved");
        for master in self.masters() {
            if master.port != from && master.port != to {
                ok(
                    master.port,
                    &["CLUSTER", "SETSLOT", &slot_arg, "NODE", to_id.as_str()],
                );
            }
        }
        self.await_stable();
    }

    /// Promotes the replica on `replica` with a coordinated manual
    /// failover (`CLUSTER FAILOVER`), calls `promoted` once it is a master,
    /// and waits until every node agrees.
    pub fn fail_over(&self, replica: u16, promoted: impl FnOnce()) {
        assert_eq!(self.cli(replica, &["CLUSTER", "FAILOVER"]), "OK");
        self.await_reply(replica, &["ROLE"], |role| role.starts_with("master"));
        promoted();
        self.await_stable();
    }

    /// Kills the node on `port` with SIGKILL: it says no goodbye to the
    /// cluster, and writes it had not yet sent to its replicas are gone with
    /// it. The other nodes take it for failed after `cluster-node-timeout`.
    pub fn crash(&self, port: u16) {
        let node = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("no node on :{port}"));
        let status = Command::new("kill")
            .args(["-KILL", &node.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL the node on :{port}");
        // The signal is delivered asynchronously: wait until the node's
        // listening socket is gone, which the kernel closes only once the
        // process has stopped running, so that the node serves nothing after
        // this returns.
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the node on :{port} still accepts connections after SIGKILL"
            );
            thread::sleep(Duration::from_millis(2));
        }
        self.crashed
            .lock()
            .expect("no test panics holding it")
            .push(port);
    }

    /// Writes `key` on the master on `master`, then `WAIT`s (for at most
    /// `timeout`) until `replicas` of its replicas have acknowledged that
    /// write, on one connection, since WAIT waits for the calling client's
    /// own writes. A master replicates in order, so a replica that
    /// acknowledged this write holds every write the master made before it.
    /// Returns how many replicas acknowledged.
    pub fn replicate(&self, master: u16, key: &str, replicas: usize, timeout: Duration) -> i64 {
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &master.to_string()])
            .args(&self.cli_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli runs");
        // redis-cli runs the lines of a piped stdin one by one, on one
        // connection, and ends at EOF.
        let script = format!("SET {key} 1\nWAIT {replicas} {}\n", timeout.as_millis());
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())
            .expect("redis-cli reads its commands");
        let output = child
            .wait_with_output()
            .expect("redis-cli ends after its two commands");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut replies = stdout.lines().map(str::trim);
        assert_eq!(
            replies.next(),
            Some("OK"),
            "SET {key} on :{master}: {stdout}"
        );
        replies
            .next()
            .and_then(|acked| acked.parse().ok())
            .unwrap_or_else(|| panic!("WAIT on :{master} answered {stdout:?}"))
    }

    /// Waits until the replica on `replica` of a crashed master has been
    /// elected master, calls `promoted`, and waits until the live nodes
    /// agree again.
    pub fn await_promotion(&self, replica: u16, promoted: impl FnOnce()) {
        self.await_reply(replica, &["ROLE"], |role| role.starts_with("master"));
        promoted();
        self.await_stable();
    }

    /// Waits until every live node reports `cluster_state:ok`, knows every
    /// other live node, sees the same slot owners, and every replica is in
    /// sync with its master.
    pub fn await_stable(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let live = self.live_ports();
        loop {
            let ok = live.iter().all(|&port| {
                self.cli(port, &["CLUSTER", "INFO"])
                    .lines()
                    .any(|line| line.trim() == "cluster_state:ok")
                    && self.nodes_seen_by(port).len() == live.len()
                    && (self.cli(port, &["ROLE"]).starts_with("master")
                        || self
                            .cli(port, &["INFO", "replication"])
                            .lines()
                            .any(|line| line.trim() == "master_link_status:up"))
            });
            // Each node's view: slot owners, and every node's role.
            type View = (BTreeMap<u16, u16>, BTreeMap<u16, Option<String>>);
            let views: Vec<View> = live
                .iter()
                .map(|&port| {
                    let slots = self
                        .slot_ranges(port)
                        .into_iter()
                        .map(|(range, owner)| (*range.start(), owner))
                        .collect();
                    let roles = self
                        .nodes_seen_by(port)
                        .into_iter()
                        .map(|seen| (seen.port, seen.master_id))
                        .collect();
                    (slots, roles)
                })
                .collect();
            let agree = views.windows(2).all(|pair| pair[0] == pair[1]) && views[0].0.len() >= 3;
            if ok && agree {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within 15 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn await_reply(&self, port: u16, args: &[&str], done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = self.cli(port, args);
            if done(&reply) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{args:?} on :{port} still answers {reply:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Node {
    /// Starts a node and waits until it answers. A port that was free a
    /// moment ago may be taken (by another test's connection, say) before
    /// redis-server binds it; the node then exits, and another pair of
    /// ports is tried. On `tls`, `server_args` must hold the TLS options.
    fn start(tls: bool, server_args: &[String], cli_args: &[String]) -> Self {
        for _ in 0..5 {
            let mut node = Self::spawn(tls, server_args);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if cli(node.port, cli_args, &["PING"]) == "PONG" {
                    return node;
                }
                if node.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start on port {}",
                    node.port
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server exited at start five times (ports taken?)");
    }

    /// Spawns a node with `server_args` after the usual options; on `tls`,
    /// its port is `--tls-port` and plaintext is off.
    fn spawn(tls: bool, server_args: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for a cluster node");
        let port = free_port();
        let port_text = port.to_string();
        let port_options = if tls {
            owned(&["--port", "0", "--tls-port", &port_text])
        } else {
            owned(&["--port", &port_text])
        };
        // The cluster bus gets a free port of its own: the default, port +
        // 10000, may be taken or past 65535.
        let bus_port = free_port();
        let child = Command::new(redis_server_binary())
            .args(port_options)
            .args([
                "--cluster-port",
                &bus_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica's first sync starts at once, not 5 s later: a
                // manual failover waits for the replica to catch up.
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &dir.path().display().to_string(),
            ])
            .args(server_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        Self {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `redis-cli` with `cli_args` against the node on `port` and returns
/// its trimmed output.
fn cli(port: u16, cli_args: &[String], args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(cli_args)
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `command` to its end and returns its output; kills it and panics,
/// with what it printed, if it takes longer than `limit`.
fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waiting on redis-cli").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .expect("a killed redis-cli is reaped");
            panic!(
                "{command:?} did not finish within {limit:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child
        .wait_with_output()
        .expect("the output of a finished redis-cli")
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|&arg| arg.to_owned()).collect()
}

fn redis_server_binary() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}
