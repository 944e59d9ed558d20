//! Acknowledged data survives SIGKILL: a child process enqueues in a loop
//! and prints each acknowledged id; the parent kills it at random moments,
//! reopens the store and finds every acknowledged id.

mod common;
use common::*;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "MESHWHISPER_CRASH_CHILD_DIR";

/// No per-hash cap: every acknowledged packet must stay.
fn config(dir: &std::path::Path) -> meshwhisper_storage::Config {
    let mut c = meshwhisper_storage::Config::new(dir);
    c.mailbox_max_per_dest = u32::MAX;
    c
}

/// The child: never returns on its own. Ignored unless run by the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by sigkill_never_loses_acknowledged_packets"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = meshwhisper_storage::Store::open(config(std::path::Path::new(&dir)))
        .await
        .expect("open");
    // Several concurrent writers so kills land inside group commits.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<i64>(1024);
    for w in 0..8u64 {
        let s = store.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            loop {
                let e = s
                    .mailbox()
                    .enqueue(dest(w), vec![(i % 251) as u8; 512], NOW)
                    .await;
                match e {
                    Ok(e) => {
                        if tx.send(e.id.0).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => panic!("enqueue failed: {err}"),
                }
                i += 1;
            }
        });
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    println!("READY");
    while let Some(id) = rx.recv().await {
        writeln!(out, "ACK {id}").expect("stdout");
        out.flush().expect("flush");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_loses_acknowledged_packets() {
    let dir = tempfile::tempdir().expect("tmp");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Vec<i64> = Vec::new();
    // A deterministic spread of kill delays (ms after the child is ready).
    let delays = [3u64, 17, 41, 5, 90, 1, 60, 23, 130, 9, 75, 33];
    for (round, delay) in delays.iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (first_ack, got_first) = std::sync::mpsc::sync_channel::<()>(1);
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    ids.push(id.trim().parse::<i64>().expect("id"));
                    if ids.len() == 1 {
                        let _ = first_ack.try_send(());
                    }
                }
            }
            ids
        });
        // Wait until the child has acknowledged something, then let it run
        // for a round-specific time before killing it mid-stream.
        got_first
            .recv_timeout(Duration::from_secs(60))
            .expect("child acknowledged nothing within 60 s");
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(*delay));
        // SIGKILL: no destructors, no flushing.
        child.kill().expect("kill");
        child.wait().expect("wait");
        let ids = reader.join().expect("reader");
        assert!(!ids.is_empty(), "round {round}: no acknowledgement read");
        assert!(started.elapsed() < Duration::from_secs(60));
        acked.extend(ids);
    }
    assert!(
        acked.len() > 100,
        "too few acknowledged packets: {}",
        acked.len()
    );
    eprintln!(
        "{} packets acknowledged across {} kills",
        acked.len(),
        delays.len()
    );
    let store = meshwhisper_storage::Store::open(config(dir.path()))
        .await
        .expect("reopen");
    let all: Vec<i64> = store
        .mailbox()
        .pending(&(0..8).map(dest).collect::<Vec<_>>(), NOW, u32::MAX)
        .await
        .expect("pending")
        .into_iter()
        .map(|p| p.id.0)
        .collect();
    let present: std::collections::HashSet<i64> = all.into_iter().collect();
    let missing: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
