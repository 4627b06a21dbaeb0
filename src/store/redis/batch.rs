//! Many decisions per script: while script calls are in flight on a
//! connection, the decisions that arrive for it wait, and go next as one
//! call of `decide_batch.lua`, which decides each of them in order,
//! exactly as if each had been sent alone, one after another.
//!
//! Decisions are grouped into lanes: one lane for a Redis server, one per
//! slot on a Redis Cluster (a script reaches one slot only). A lane keeps
//! at most sixteen calls in flight. A decision that finds fewer is sent at
//! once, from the caller's own task, as it would be without batching:
//! latency comes first and nothing ever waits to fill a batch. A decision
//! that finds sixteen queues; when a call in flight answers, whatever queued
//! meanwhile (up to `store.max_batch`, in arrival order) goes as one script
//! call, from a task that keeps sending until the queue is empty. So under
//! light load every decision is one `EVALSHA` as before, and under heavy
//! load Redis parses one command, runs one `TIME` and writes one reply per
//! batch, not per decision, and tollgate sends one command and parses one
//! reply instead of many.
//!
//! Ordering: a decision is sent only after every decision that queued
//! before it in its lane, and within a batch in queue order, so a
//! decision's answer never depends on one that came after it (with
//! `pool_size > 1` two calls in flight may reach Redis in either order,
//! but their decisions were all waiting at once, so either order is one in
//! which they could have arrived). Each waiting caller keeps its own
//! deadline; one that gave up (its timeout, or its client went away) is
//! left out of the batch rather than counted.

use std::{
    collections::VecDeque,
    sync::{LazyLock, Mutex, MutexGuard, OnceLock},
};

use prometheus_client::metrics::histogram::Histogram;
use redis::{Arg, Value};
use tokio::{sync::oneshot, time::timeout_at};

use super::{Connections, Invocation, LuaScript, RedisStore};
use crate::{keys::cluster_slot, store::StoreError};

/// The batch script; see the contract in `lua/decide_batch.lua`.
static DECIDE_BATCH: LazyLock<LuaScript> =
    LazyLock::new(|| composed_script!("decide_batch.lua", lua_function!("check_limits")));

/// The batch script, for loading at start-up.
pub(super) fn scripts() -> [&'static LuaScript; 1] {
    [&DECIDE_BATCH]
}

/// The most decisions one batch may carry, whatever `store.max_batch`
/// says: a script blocks Redis while it runs, and 512 decisions take it
/// a few milliseconds.
pub const MAX_BATCH_LIMIT: u32 = 512;

/// What a decision's caller gets back: its script's reply, or why there
/// is none.
type Answer = Result<Value, StoreError>;

/// A decision waiting in its lane.
struct Waiting {
    invocation: Invocation,
    reply: oneshot::Sender<Answer>,
}

/// How many script calls one lane keeps in flight before decisions queue.
/// Batches should form only when Redis falls behind: a lane that queued
/// early made tollgate and Redis take turns (tollgate reads a burst of
/// requests, Redis runs it as one batch while tollgate waits, and back),
/// which a client pipelining one EVALSHA per decision does not. Measured
/// against such a client (bench/floor.rs) on one thread, decisions/s at 50
/// and 200 in flight: one call in flight 0.87-0.92x at 50; four 0.96-1.0x
/// and 1.04-1.05x; then, on tollgate's one-thread runtime, sixteen
/// 1.0-1.07x and 1.09-1.10x, thirty-two no better.
const LANE_DEPTH: usize = 16;

/// One lane: the calls in flight, and what waits for one of them to end.
#[derive(Default)]
struct Lane {
    in_flight: usize,
    queue: VecDeque<Waiting>,
}

/// The lanes of one store: one for a server, one per slot (16,384) for a
/// cluster, indexed by slot, so a decision finds its lane without hashing
/// (about 40 bytes a lane: 640 KB for a cluster).
pub(super) struct Combiner {
    max_batch: usize,
    lanes: Mutex<Vec<Lane>>,
    /// Decisions per script call sent from a lane
    /// (`tollgate_store_batch_size`), once metrics are attached.
    sizes: OnceLock<Histogram>,
}

/// How a decision joined its lane.
enum Joined {
    /// The lane had room for one more call in flight: the caller sends its
    /// decision now, and hands its place on when done.
    Sender(Invocation),
    /// The lane was full: the answer comes here.
    Queued(oneshot::Receiver<Answer>),
}

impl Combiner {
    /// `lanes` lanes (1, or a cluster's 16,384 slots) that send at most
    /// `max_batch` decisions per script call (at least 2; 1 means no
    /// batching and no combiner at all).
    pub(super) fn new(max_batch: u32, lanes: usize) -> Self {
        Self {
            max_batch: usize::try_from(max_batch.clamp(2, MAX_BATCH_LIMIT)).unwrap_or(2),
            lanes: Mutex::new((0..lanes.max(1)).map(|_| Lane::default()).collect()),
            sizes: OnceLock::new(),
        }
    }

    /// The most decisions one script call carries.
    pub(super) fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Counts every script call's decisions into `sizes` from now on.
    pub(super) fn observe(&self, sizes: Histogram) {
        // Attached once, at start-up; a second attach keeps the first.
        let _ = self.sizes.set(sizes);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Lane>> {
        // A panic while holding the lock leaves only plain queues behind.
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count(&self, decisions: usize) {
        if let Some(sizes) = self.sizes.get() {
            #[allow(clippy::cast_precision_loss)]
            sizes.observe(decisions as f64);
        }
    }

    fn join(&self, lane: u16, invocation: Invocation) -> Joined {
        let mut lanes = self.lock();
        // Lanes are numbered by slot, below the lane count: 0 on a server.
        let Some(lane) = lanes.get_mut(usize::from(lane)) else {
            return Joined::Sender(invocation);
        };
        // Queued decisions go first: a newcomer never overtakes them.
        if lane.in_flight < LANE_DEPTH && lane.queue.is_empty() {
            lane.in_flight += 1;
            return Joined::Sender(invocation);
        }
        let (reply, answer) = oneshot::channel();
        lane.queue.push_back(Waiting { invocation, reply });
        Joined::Queued(answer)
    }

    /// The next batch for a sender of `lane` whose call just ended, in
    /// arrival order, leaving out callers that gave up; or `None`, and the
    /// sender leaves the lane (idle again once no call is in flight), when
    /// nothing waits.
    fn next_batch(&self, lane: u16) -> Option<Vec<Waiting>> {
        let mut lanes = self.lock();
        let state = lanes.get_mut(usize::from(lane))?;
        let mut batch = Vec::with_capacity(state.queue.len().min(self.max_batch));
        // At most max_batch decisions, a group counting as its checks; one
        // call whatever its size.
        let mut decisions = 0;
        while let Some(waiting) = state.queue.front() {
            let size = waiting.invocation.decisions();
            if !batch.is_empty() && decisions + size > self.max_batch {
                break;
            }
            let Some(waiting) = state.queue.pop_front() else {
                break;
            };
            if !waiting.reply.is_closed() {
                decisions += size;
                batch.push(waiting);
            }
        }
        if batch.is_empty() {
            state.in_flight = state.in_flight.saturating_sub(1);
            return None;
        }
        Some(batch)
    }
}

/// The lane a caller is sending on; dropping it (when the call ends, or
/// when the caller's future is dropped mid-call) hands the lane to what
/// queued meanwhile, so a caller that goes away never stalls its lane.
struct Turn<'a> {
    store: &'a RedisStore,
    combiner: &'a Combiner,
    lane: u16,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Some(batch) = self.combiner.next_batch(self.lane) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.store.clone().drain(self.lane, batch));
            }
            // No runtime (it is shutting down): nobody is left to answer;
            // the waiting callers see their senders dropped.
            Err(_) => {
                drop(batch);
                if let Some(lane) = self.combiner.lock().get_mut(usize::from(self.lane)) {
                    *lane = Lane::default();
                }
            }
        }
    }
}

impl RedisStore {
    /// Runs one decision's script, in a batch when others are waiting for
    /// its lane (see the module docs); the reply is the script's own
    /// either way.
    pub(super) async fn run_decision(&self, invocation: Invocation) -> Answer {
        let Some(combiner) = self.shared.combiner.as_ref() else {
            return self.run_script(&invocation).await;
        };
        let lane = self.lane_of(&invocation);
        match combiner.join(lane, invocation) {
            Joined::Sender(invocation) => {
                let _turn = Turn {
                    store: self,
                    combiner,
                    lane,
                };
                combiner.count(invocation.decisions());
                self.run_script(&invocation).await
            }
            Joined::Queued(answer) => match timeout_at(self.deadline(), answer).await {
                Ok(Ok(answer)) => answer,
                // The lane's task ended without answering: the runtime is
                // shutting down.
                Ok(Err(_)) => Err(StoreError::Unavailable(format!(
                    "Redis at {}: the batch was dropped",
                    self.shared.masked_url
                ))),
                Err(_) => Err(StoreError::Timeout(self.shared.timeout)),
            },
        }
    }

    /// The lane `invocation` goes in: 0 on a server, its keys' slot on a
    /// cluster.
    pub(super) fn lane_of(&self, invocation: &Invocation) -> u16 {
        match &self.connections {
            Connections::Server(_) => 0,
            Connections::Cluster(_) => invocation.first_key().map_or(0, slot_of),
        }
    }

    /// Keeps a lane busy, sending what queues in it a batch at a time,
    /// until nothing waits.
    async fn drain(self, lane: u16, mut batch: Vec<Waiting>) {
        let Some(combiner) = self.shared.combiner.as_ref() else {
            return;
        };
        loop {
            combiner.count(
                batch
                    .iter()
                    .map(|waiting| waiting.invocation.decisions())
                    .sum(),
            );
            let (invocations, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|waiting| (waiting.invocation, waiting.reply))
                .unzip();
            let answers = self.decide_together(&invocations).await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                // A caller that gave up meanwhile no longer listens.
                let _ = reply.send(answer);
            }
            match combiner.next_batch(lane) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// Runs `invocations`, all decision scripts with keys in one slot, in
    /// order: one alone as itself, several as one `decide_batch.lua`.
    /// Returns one answer per invocation, in order.
    pub(super) async fn decide_together(&self, invocations: &[Invocation]) -> Vec<Answer> {
        if let [alone] = invocations {
            return vec![self.run_script(alone).await];
        }
        let batch = batch_invocation(invocations);
        let replies = match self.run_script(&batch).await {
            Ok(Value::Array(replies)) if replies.len() == invocations.len() => replies,
            Ok(other) => {
                let problem = format!(
                    "malformed reply to {}: {other:?} for {} decisions",
                    DECIDE_BATCH.name,
                    invocations.len()
                );
                return invocations
                    .iter()
                    .map(|_| Err(StoreError::Protocol(problem.clone())))
                    .collect();
            }
            Err(err) => return invocations.iter().map(|_| Err(copy_error(&err))).collect(),
        };
        invocations
            .iter()
            .zip(replies)
            .map(|(invocation, reply)| match reply {
                Value::BulkString(message) => {
                    Err(self
                        .script_error(invocation.script.name, &String::from_utf8_lossy(&message)))
                }
                Value::SimpleString(message) => {
                    Err(self.script_error(invocation.script.name, &message))
                }
                reply => Ok(reply),
            })
            .collect()
    }

    /// A decision's error inside a batch, classified as the same error
    /// would be for the script alone.
    fn script_error(&self, script: &str, message: &str) -> StoreError {
        let code = message.split_whitespace().next().unwrap_or("");
        if super::TRANSIENT_CODES.contains(&code) {
            StoreError::Unavailable(format!(
                "Redis at {}: {script}: {message}",
                self.shared.masked_url
            ))
        } else {
            StoreError::Protocol(format!("Redis replied with an error: {script}: {message}"))
        }
    }
}

/// The cluster slot of a key given as a script argument.
fn slot_of(key: &[u8]) -> u16 {
    cluster_slot(&String::from_utf8_lossy(key))
}

/// One `decide_batch.lua` call carrying `invocations` in order, as runs of
/// consecutive invocations of one script and shape (see its header for the
/// layout); a run whose invocations all take the same arguments sends them
/// once.
fn batch_invocation(invocations: &[Invocation]) -> Invocation {
    let runs = runs_of(invocations);
    let keys: usize = invocations.iter().map(Invocation::numkeys).sum();
    let args: usize = invocations
        .iter()
        .map(|invocation| invocation.args().count())
        .sum();
    let bytes: usize = invocations.iter().map(Invocation::packed_len).sum();
    let mut batch = Invocation::with_capacity(
        &DECIDE_BATCH,
        keys,
        1 + 5 * runs.len() + args,
        bytes + 16 * (1 + runs.len()),
    );
    for invocation in invocations {
        for key in invocation.keys() {
            batch = batch.key(key);
        }
    }
    batch = batch.arg(invocations.len());
    for run in runs {
        let first = &run[0];
        let shared = run[1..]
            .iter()
            .all(|invocation| invocation.args().eq(first.args()));
        batch = batch
            .arg(first.script.function.unwrap_or(first.script.name))
            .arg(first.numkeys())
            .arg(first.args().count())
            .arg(run.len())
            .arg(u8::from(shared));
        let with_args = if shared { &run[..1] } else { run };
        for invocation in with_args {
            for arg in invocation.args() {
                batch = batch.arg(arg);
            }
        }
    }
    batch
}

/// `invocations` cut into runs of consecutive invocations of one script
/// with as many keys and arguments each, in order.
fn runs_of(invocations: &[Invocation]) -> Vec<&[Invocation]> {
    let shape = |invocation: &Invocation| {
        (
            invocation.script.name,
            invocation.numkeys(),
            invocation.args().count(),
        )
    };
    invocations.chunk_by(|a, b| shape(a) == shape(b)).collect()
}

/// The same error again, for each decision of a batch that failed whole.
fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Timeout(timeout) => StoreError::Timeout(*timeout),
        StoreError::Unavailable(message) => StoreError::Unavailable(message.clone()),
        StoreError::CircuitOpen(wait) => StoreError::CircuitOpen(*wait),
        StoreError::Protocol(message) => StoreError::Protocol(message.clone()),
    }
}

/// The bytes of a packed argument (`Cmd` never holds a cursor argument for
/// these scripts).
pub(super) fn arg_bytes(arg: Arg<&[u8]>) -> &[u8] {
    match arg {
        Arg::Simple(bytes) => bytes,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SLIDING_COUNTER, SLIDING_LOG};
    use super::*;

    fn decision(script: &'static LuaScript, keys: &[&str], args: &[&str]) -> Invocation {
        let mut invocation = Invocation::new(script, keys.len());
        for key in keys {
            invocation = invocation.key(*key);
        }
        for arg in args {
            invocation = invocation.arg(*arg);
        }
        invocation
    }

    fn text(args: impl Iterator<Item = impl AsRef<[u8]>>) -> Vec<String> {
        args.map(|arg| String::from_utf8_lossy(arg.as_ref()).into_owned())
            .collect()
    }

    /// A batch takes at most max_batch decisions, a group counting as its
    /// checks, and always at least one call, in arrival order.
    #[test]
    fn a_batch_counts_a_group_as_its_checks() {
        let combiner = Combiner::new(4, 1);
        let five = ["10", "60000000", "1", "0", "0"];
        for _ in 0..LANE_DEPTH {
            assert!(matches!(
                combiner.join(0, decision(&SLIDING_LOG, &["a"], &five)),
                Joined::Sender(_)
            ));
        }
        let mut waiting = Vec::new();
        for size in [3, 3, 1, 6, 1] {
            let invocation = decision(&SLIDING_LOG, &["a"], &five).deciding(size);
            match combiner.join(0, invocation) {
                Joined::Queued(answer) => waiting.push(answer),
                Joined::Sender(_) => panic!("the lane is full"),
            }
        }
        let sizes = |batch: Vec<Waiting>| -> Vec<usize> {
            batch.iter().map(|w| w.invocation.decisions()).collect()
        };
        let batches: Vec<Vec<usize>> = std::iter::from_fn(|| combiner.next_batch(0))
            .map(sizes)
            .take(5)
            .collect();
        assert_eq!(batches, [vec![3], vec![3, 1], vec![6], vec![1]]);
        drop(waiting);
    }

    #[test]
    fn a_batch_is_runs_of_one_script_and_shape_in_order() {
        let five = ["10", "60000000", "1", "0", "0"];
        let invocations = [
            decision(&SLIDING_LOG, &["a"], &five),
            decision(&SLIDING_LOG, &["b"], &five),
            decision(&SLIDING_COUNTER, &["c"], &five),
            decision(
                &SLIDING_LOG,
                &["d", "d:block"],
                &["10", "60000000", "1", "0", "5"],
            ),
            decision(&SLIDING_LOG, &["e"], &five),
        ];
        let lengths: Vec<usize> = runs_of(&invocations).iter().map(|run| run.len()).collect();
        assert_eq!(lengths, [2, 1, 1, 1]);

        let batch = batch_invocation(&invocations);
        assert_eq!(text(batch.keys()), ["a", "b", "c", "d", "d:block", "e"]);
        let mut want = vec!["5".to_owned()];
        for (function, nkeys, count, sent) in [
            // Both take `five`: sent once.
            ("sliding_log", "1", 2, vec![five]),
            ("sliding_counter", "1", 1, vec![five]),
            (
                "sliding_log",
                "2",
                1,
                vec![["10", "60000000", "1", "0", "5"]],
            ),
            ("sliding_log", "1", 1, vec![five]),
        ] {
            want.extend([function, nkeys, "5"].map(str::to_owned));
            want.extend([count.to_string(), "1".to_owned()]);
            want.extend(sent.concat().into_iter().map(str::to_owned));
        }
        assert_eq!(text(batch.args()), want);
    }

    /// A run whose decisions take different arguments sends each its own.
    #[test]
    fn a_run_sends_its_arguments_once_only_when_all_are_the_same() {
        let one = ["10", "60000000", "1", "0", "0"];
        let three = ["10", "60000000", "3", "0", "0"];
        let invocations = [
            decision(&SLIDING_LOG, &["a"], &one),
            decision(&SLIDING_LOG, &["b"], &three),
            decision(&SLIDING_LOG, &["c"], &one),
        ];
        let batch = batch_invocation(&invocations);
        let mut want: Vec<String> = ["3", "sliding_log", "1", "5", "3", "0"]
            .map(str::to_owned)
            .to_vec();
        want.extend([one, three, one].concat().into_iter().map(str::to_owned));
        assert_eq!(text(batch.args()), want);
    }
}
