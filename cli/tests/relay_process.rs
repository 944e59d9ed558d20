//! The relay as a separate process: packets queued for an offline recipient
//! survive SIGKILL and a restart and are delivered once; the database holds
//! only ciphertext.

use futures::{SinkExt as _, StreamExt as _};
use meshwhisper_crypto::primitives::X25519Secret;
use meshwhisper_crypto::ratchet::Session;
use rand_core::SeedableRng as _;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

struct RelayProc {
    child: Child,
    http: String,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_relay(dir: &std::path::Path) -> RelayProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args([
            "relay",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relay");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(h) = line.strip_prefix("http=http://") {
                let _ = tx.send(h.to_string());
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("relay did not report its address");
    RelayProc { child, http }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(addr: &str) -> Ws {
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{addr}/")),
    )
    .await
    .expect("connect timeout")
    .expect("connect")
    .0
}

async fn stored_blobs(addr: &str) -> u64 {
    use http_body_util::BodyExt as _;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: hyper::Uri = format!("http://{addr}/health").parse().expect("uri");
    let resp = client.get(uri).await.expect("health");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    v["storedBlobs"].as_u64().expect("storedBlobs")
}

async fn wait_stored(addr: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stored_blobs(addr).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "storedBlobs never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const B: &str = "bbbbbbbbbbbbbbbb";

fn packet(payload: &[u8]) -> Vec<u8> {
    meshwhisper_behaviour::packet::build(
        1,
        meshwhisper_crypto::destination::DestHash::from_hex(B).expect("hex"),
        [3u8; 16],
        7,
        payload,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_packets_survive_sigkill_and_arrive_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let relay = spawn_relay(dir.path());
    let mut alice = ws(&relay.http).await;
    for i in 0..50u32 {
        alice
            .send(Message::Binary(packet(&i.to_be_bytes()).into()))
            .await
            .expect("send");
    }
    // Every packet is committed once /health counts it.
    wait_stored(&relay.http, 50).await;
    drop(relay); // SIGKILL (Child::kill), no shutdown path runs.

    let relay = spawn_relay(dir.path());
    let mut bob = ws(&relay.http).await;
    let hello = serde_json::json!({"type": "hello", "destHashes": [B]}).to_string();
    bob.send(Message::Text(hello.into())).await.expect("hello");
    // Bob reads as a client does, all the time (answering the relay's
    // pings, which confirm deliveries).
    let (mut bob_tx, mut bob_rx) = bob.split();
    let (tx, mut packets) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(Ok(m)) = bob_rx.next().await {
            if let Message::Binary(b) = m
                && tx.send(b).await.is_err()
            {
                break;
            }
        }
    });
    let mut got = Vec::new();
    while got.len() < 50 {
        let b = tokio::time::timeout(Duration::from_secs(10), packets.recv())
            .await
            .expect("frame")
            .expect("open");
        got.push(u32::from_be_bytes(b[31..35].try_into().expect("4 bytes")));
    }
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    wait_stored(&relay.http, 0).await;
    bob_tx
        .send(Message::Text(r#"{"type":"pull"}"#.into()))
        .await
        .expect("pull");
    let extra = tokio::time::timeout(Duration::from_millis(300), packets.recv()).await;
    assert!(extra.is_err(), "duplicate delivery: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_media_hold_only_ciphertext() {
    let dir = tempfile::tempdir().expect("tmp");
    let relay = spawn_relay(dir.path());
    // A client encrypts with the Double Ratchet before sending.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let spk = X25519Secret::generate(&mut rng);
    let mut session =
        Session::initiator(&mut rng, &[5u8; 32], &spk.public(), b"ad").expect("session");
    let secret_text = b"MEET AT THE OLD MILL AT NOON - plaintext marker 7f3a";
    let mut alice = ws(&relay.http).await;
    let mut first_ct = Vec::new();
    for _ in 0..5 {
        let ct = session.encrypt(secret_text).expect("encrypt");
        if first_ct.is_empty() {
            first_ct = ct.clone();
        }
        alice
            .send(Message::Binary(packet(&ct).into()))
            .await
            .expect("send");
    }
    // An encrypted media upload too.
    let media_ct = session.encrypt(secret_text).expect("encrypt");
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = hyper::Request::post(format!("http://{}/media", relay.http))
        .body(http_body_util::Full::new(bytes::Bytes::from(media_ct)))
        .expect("req");
    assert!(
        client
            .request(req)
            .await
            .expect("upload")
            .status()
            .is_success()
    );
    wait_stored(&relay.http, 5).await;
    drop(relay);
    let mut scanned = 0;
    let mut ciphertext_seen = false;
    for entry in meshwhisper_tests::files_under(dir.path()) {
        let bytes = std::fs::read(&entry).expect("read");
        scanned += bytes.len();
        ciphertext_seen |= meshwhisper_tests::contains(&bytes, &first_ct);
        assert!(
            !meshwhisper_tests::contains(&bytes, secret_text),
            "plaintext found in {}",
            entry.display()
        );
    }
    assert!(scanned > 10_000, "scanned only {scanned} bytes");
    // Control: what the relay stored is found by the same scan.
    assert!(
        ciphertext_seen,
        "the stored ciphertext was not found: the scan proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut relay = spawn_relay(dir.path());
    let mut alice = ws(&relay.http).await;
    alice
        .send(Message::Binary(packet(b"before shutdown").into()))
        .await
        .expect("send");
    wait_stored(&relay.http, 1).await;
    let pid = relay.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), alice.next())
            .await
            .expect("close frame")
        {
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    let code = tokio::task::spawn_blocking(move || relay.child.wait().map(|s| s.code()))
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(code, Some(0));
}
