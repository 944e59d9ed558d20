//! Running our binary as people and operators do: relay processes, CLI
//! commands, long-running `listen`/`chat` processes whose output lines
//! arrive on channels (bounded waits, no sleeps).
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
}

fn pump(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::sync_channel(4096);
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child whose stdout and stderr lines arrive on channels; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub errs: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self::spawn_with(cmd, Stdio::piped())
    }

    /// With stderr going to `stderr` (a log file, say) instead of `errs`.
    pub fn spawn_with(cmd: &mut Command, stderr: Stdio) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn");
        let lines = pump(child.stdout.take().expect("stdout"));
        let errs = match child.stderr.take() {
            Some(e) => pump(e),
            None => mpsc::sync_channel(1).1,
        };
        Proc { child, lines, errs }
    }

    fn wait_line(rx: &mpsc::Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let l = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} in time"));
            if f(&l) {
                return l;
            }
        }
    }

    /// The first stdout line for which `f` holds (bounded wait).
    pub fn until(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        Self::wait_line(&self.lines, what, f)
    }

    /// The first stderr line for which `f` holds (bounded wait).
    pub fn until_err(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        Self::wait_line(&self.errs, what, f)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// The exit status, waiting at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.child.wait().expect("wait")
    }
}

/// Runs `meshwhisper args`, asserting success; its stdout.
pub fn run(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("run");
    assert!(
        out.status.success(),
        "meshwhisper {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Runs `meshwhisper args`, asserting it fails with exit code 1; its stderr.
pub fn run_fail(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "meshwhisper {args:?} should fail: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).expect("utf8")
}

pub fn json(l: &str) -> serde_json::Value {
    serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))
}

/// `listen --json` on a profile.
pub fn listen(profile: &Path) -> Proc {
    Proc::spawn(bin().args(["listen", "--json", "--profile"]).arg(profile))
}

/// A relay process and what it printed.
pub struct RelayProc {
    pub proc: Proc,
    /// `listen=` (the first libp2p address, with /p2p/).
    pub addr: String,
    /// `http=` (a URL).
    pub http: String,
    pub peer: String,
}

/// Starts `meshwhisper relay` on loopback with free ports (unless `extra`
/// names others) in `data_dir`.
pub fn relay(data_dir: &Path, extra: &[&str]) -> RelayProc {
    let mut cmd = bin();
    cmd.arg("relay").arg("--data-dir").arg(data_dir);
    if !extra.contains(&"--http") {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
    }
    cmd.args(extra).env("RUST_LOG", "info");
    let proc = Proc::spawn(&mut cmd);
    let peer = proc
        .until("peer_id=", |l| l.starts_with("peer_id="))
        .trim_start_matches("peer_id=")
        .to_string();
    let http = proc
        .until("http=", |l| l.starts_with("http="))
        .trim_start_matches("http=")
        .to_string();
    let addr = proc
        .until("listen=", |l| l.starts_with("listen="))
        .trim_start_matches("listen=")
        .to_string();
    RelayProc {
        proc,
        addr,
        http,
        peer,
    }
}

/// `GET url` with curl (bounded), the body.
pub fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates profile `name` under `dir` homed on `relay_addr`.
pub fn profile(dir: &Path, name: &str, relay_addr: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    run(&[
        "id",
        "new",
        "--profile",
        p.to_str().expect("utf8"),
        "--relay",
        relay_addr,
        "--name",
        name,
    ]);
    p
}

/// `invite` of a profile, one line.
pub fn invite(p: &Path) -> String {
    run(&["invite", "--profile", p.to_str().expect("utf8")])
        .trim()
        .to_string()
}

/// Brings a profile online once so its prekeys are at its relay.
pub fn publish_prekeys(p: &Path) {
    let l = listen(p);
    l.until("prekeys published", |x| {
        json(x)["event"] == "prekeys" && json(x)["oneTime"] == 100
    });
    assert!(l.stop().success());
}

/// A port nobody listens on (bound once by us, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}
