//! The `tollgate` binary run as an operator would: a child process with
//! every log at `trace`, its output captured for the tests to search.

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use std::{
    fs::File,
    io::{Read, Seek},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A spawned `tollgate`, killed when dropped; stdout and stderr go to one
/// temporary file.
pub struct Tollgate {
    child: Child,
    output: File,
}

impl Tollgate {
    /// Runs `tollgate args...` from the project root with `env` added, no
    /// `TOLLGATE_*` variable inherited from the test's environment, and
    /// `RUST_LOG=trace`: everything the binary and its libraries can say.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let output = tempfile::tempfile().expect("a temporary file for the output");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command.current_dir(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("a second handle to the output"))
            .stderr(output.try_clone().expect("a third handle to the output"))
            .spawn()
            .expect("the tollgate binary starts");
        Self { child, output }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting on the child")
    }

    /// Waits up to `limit` for the exit; the status's success.
    pub fn wait(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "tollgate still running");
            thread::sleep(Duration::from_millis(10));
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

    /// Sends SIGTERM and asserts a clean exit within `limit`.
    pub fn stop(&mut self, limit: Duration) {
        self.signal("-TERM");
        assert!(
            self.wait(limit),
            "a clean exit on SIGTERM: {}",
            self.output()
        );
    }

    /// Everything it printed so far.
    pub fn output(&mut self) -> String {
        let mut text = String::new();
        self.output.rewind().expect("rewind the output file");
        self.output
            .read_to_string(&mut text)
            .expect("the output is UTF-8");
        text
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
