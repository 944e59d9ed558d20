//! A relay started in-process on free loopback ports, plus small HTTP and
//! WebSocket clients.
#![allow(dead_code)]

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshwhisper_node::config::Config;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub struct Relay {
    pub running: Option<meshwhisper_node::Running>,
    pub base: String,
    pub ws: String,
    pub dir: tempfile::TempDir,
}

pub async fn start(f: impl FnOnce(&mut Config)) -> Relay {
    let dir = tempfile::tempdir().expect("tmp");
    start_in(dir, f).await
}

/// Sends the relays' logs to the test's captured output (printed only when
/// the test fails). `MW_TEST_LOG` sets the filter (`RUST_LOG` syntax);
/// otherwise `default`, from the first call in the test binary (relays
/// started without one log at info).
pub fn init_logs(default: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MW_TEST_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(filter)
            .try_init();
    });
}

pub async fn start_in(dir: tempfile::TempDir, f: impl FnOnce(&mut Config)) -> Relay {
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        http: "127.0.0.1:0".into(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        ..Config::default()
    };
    f(&mut cfg);
    init_logs("meshwhisper_node=info");
    let running = meshwhisper_node::start(cfg).await.expect("start relay");
    let addr = running.http_addr;
    Relay {
        running: Some(running),
        base: format!("http://{addr}"),
        ws: format!("ws://{addr}/"),
        dir,
    }
}

impl Relay {
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    http_from(None, method, url, headers, body).await
}

/// [`http`] from a chosen local address (e.g. 127.0.0.2: another client
/// address on loopback).
pub async fn http_from(
    local: Option<std::net::IpAddr>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut conn = hyper_util::client::legacy::connect::HttpConnector::new();
    conn.set_local_address(local);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(conn);
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("http timeout")
        .expect("http");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn get(url: &str) -> Resp {
    http("GET", url, &[], Bytes::new()).await
}

pub async fn post_json(url: &str, v: serde_json::Value) -> Resp {
    http(
        "POST",
        url,
        &[("content-type", "application/json")],
        v.to_string(),
    )
    .await
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client that keeps reading in the background, as real
/// clients do: pings are answered at once (the relay deletes a live
/// delivery only after the pong that follows it), and what arrives waits
/// on a channel for [`Ws::next`].
pub struct Ws {
    sink: futures::stream::SplitSink<WsStream, Message>,
    rx: tokio::sync::mpsc::Receiver<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Ws {
    pub async fn send(&mut self, m: Message) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.sink.send(m).await
    }

    /// The next message other than a ping or pong.
    pub async fn next(&mut self) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        self.rx.recv().await
    }

    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}

pub async fn ws(url: &str) -> Ws {
    let (s, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("ws connect timeout")
    .expect("ws connect");
    let (sink, mut stream) = s.split();
    // Far more than any test leaves unread.
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    let reader = tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            let end = m.is_err();
            if matches!(m, Ok(Message::Ping(_) | Message::Pong(_))) {
                continue;
            }
            if tx.send(m).await.is_err() || end {
                break;
            }
        }
    });
    Ws { sink, rx, reader }
}

pub async fn hello(ws: &mut Ws, hashes: &[&str]) {
    let v = serde_json::json!({ "type": "hello", "destHashes": hashes });
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send hello");
}

/// The next binary frame (bounded wait).
pub async fn next_packet(ws: &mut Ws) -> Vec<u8> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("socket ended")
            .expect("socket error");
        match m {
            Message::Binary(b) => return b.to_vec(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The close frame the relay sends (bounded wait).
pub async fn next_close(ws: &mut Ws) -> (u16, String) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s");
        match m {
            Some(Ok(Message::Close(Some(c)))) => return (u16::from(c.code), c.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => return (0, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close: {e}"),
        }
    }
}

/// A packet for `dest` (16 hex digits) with `payload`.
pub fn packet(dest: &str, payload: &[u8]) -> Vec<u8> {
    let d = meshwhisper_crypto::destination::DestHash::from_hex(dest).expect("hex");
    meshwhisper_behaviour::packet::build(1, d, [7u8; 16], 7, payload)
}

/// Polls `/health` until `pred` holds (bounded).
pub async fn wait_health(
    base: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = get(&format!("{base}/health")).await.json();
        if pred(&h) {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never matched: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watches a bounded wait for what the machine did meanwhile, for the
/// failure message: the longest gap between two checks (the process was
/// not scheduled, or the VM paused) and how far the wall clock moved
/// against the monotonic one (a clock step).
pub struct WaitWatch {
    wall: std::time::SystemTime,
    mono: std::time::Instant,
    last: std::time::Instant,
    max_gap: Duration,
}

impl Default for WaitWatch {
    fn default() -> Self {
        let now = std::time::Instant::now();
        WaitWatch {
            wall: std::time::SystemTime::now(),
            mono: now,
            last: now,
            max_gap: Duration::ZERO,
        }
    }
}

impl WaitWatch {
    /// Called at every check.
    pub fn tick(&mut self) {
        let now = std::time::Instant::now();
        self.max_gap = self.max_gap.max(now - self.last);
        self.last = now;
    }

    /// One line for a failure message.
    pub fn describe(&self) -> String {
        let mono = self.mono.elapsed().as_millis() as i128;
        let wall = match self.wall.elapsed() {
            Ok(d) => d.as_millis() as i128,
            Err(e) => -(e.duration().as_millis() as i128),
        };
        format!(
            "longest gap between checks {} ms; monotonic clock moved {mono} ms, wall clock {wall} ms",
            self.max_gap.as_millis()
        )
    }
}

/// The value of the relay's metric `name` (from `/metrics`).
pub async fn metric(base: &str, name: &str) -> u64 {
    let text = String::from_utf8(get(&format!("{base}/metrics")).await.body).expect("utf8");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}
