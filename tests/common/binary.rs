//! The `tollgate` binary run as an operator would: a child process, killed
//! when its guard drops, its stdout and stderr captured to files (a chatty
//! child never blocks on a full pipe) for the tests to search.

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use std::{
    fs::File,
    io::{Read, Seek},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A spawned `tollgate`, killed when dropped.
pub struct Tollgate {
    child: Child,
    stdout: File,
    stderr: File,
}

impl Tollgate {
    /// The binary, run from the project root with no `TOLLGATE_*` variable
    /// inherited from the test's environment (only what a test sets
    /// applies), `RUST_LOG` unset, and `RUST_BACKTRACE=1`: a panic would
    /// print a backtrace, which the tests assert never appears.
    pub fn command() -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command.current_dir(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        command.env("RUST_BACKTRACE", "1").env_remove("RUST_LOG");
        command
    }

    /// Runs `tollgate args...` with `env` added and `RUST_LOG=trace`:
    /// everything the binary and its libraries can say.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Self::command();
        command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "trace");
        Self::spawn_command(command)
    }

    /// Runs `command`, as [`Tollgate::command`] made it and a test
    /// completed it.
    pub fn spawn_command(mut command: Command) -> Self {
        let stdout = tempfile::tempfile().expect("a temporary file for stdout");
        let stderr = tempfile::tempfile().expect("a temporary file for stderr");
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().expect("a second handle to stdout"))
            .stderr(stderr.try_clone().expect("a second handle to stderr"))
            .spawn()
            .expect("the tollgate binary starts");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting on the child")
    }

    /// Waits up to `limit` for the exit; `None` if it is still running.
    pub fn wait_at_most(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `limit` for the exit, failing the test past it; the
    /// status's success.
    pub fn wait(&mut self, limit: Duration) -> bool {
        match self.wait_at_most(limit) {
            Some(status) => status.success(),
            None => panic!("tollgate still running after {limit:?}: {}", self.output()),
        }
    }

    /// Sends `signal` (as kill(1) names it: "-HUP", "-TERM").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// Sends SIGTERM, as an orchestrator does, and asserts a clean exit
    /// (status 0) within `limit`.
    pub fn stop(&mut self, limit: Duration) {
        self.signal("-TERM");
        assert!(
            self.wait(limit),
            "a clean exit on SIGTERM: {}",
            self.output()
        );
    }

    /// What it printed on stdout so far.
    pub fn stdout(&mut self) -> String {
        read(&mut self.stdout)
    }

    /// What it printed on stderr so far.
    pub fn stderr(&mut self) -> String {
        read(&mut self.stderr)
    }

    /// Everything it printed so far: stdout, then stderr.
    pub fn output(&mut self) -> String {
        self.stdout() + &self.stderr()
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        // Ignored: the child may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(file: &mut File) -> String {
    let mut text = String::new();
    file.rewind().expect("rewind an output file");
    file.read_to_string(&mut text).expect("the output is UTF-8");
    text
}
