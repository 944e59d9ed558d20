//! `meshwhisper bench forwarder`: the practical limit a relay is measured
//! against. A minimal WebSocket forwarder on the same stack as the relay's
//! gateway (tokio-tungstenite): `hello` registers a connection's
//! destination hashes, and each binary frame goes to the connection that
//! registered its destination, or nowhere. It stores nothing, acknowledges
//! nothing and checks nothing beyond the packet header: what is left of a
//! relay once every promise it makes is taken away.

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use meshwhisper_crypto::destination::DestHash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, clap::Args)]
pub struct ForwarderBench {
    /// Address to listen on for WebSocket clients (port 0: any free port;
    /// the address taken is printed as `listening=ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    http: String,
    /// Frames queued per connection before its senders wait.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

type Routes = Arc<Mutex<HashMap<DestHash, mpsc::Sender<Message>>>>;

pub fn run(b: ForwarderBench) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if b.threads > 0 {
        rt.worker_threads(b.threads);
    }
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(serve(b))
}

async fn serve(b: ForwarderBench) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&b.http)
        .await
        .with_context(|| format!("listening on {}", b.http))?;
    println!("listening={}", listener.local_addr()?);
    let routes: Routes = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await.context("accept")?;
        let _ = tcp.set_nodelay(true);
        let routes = routes.clone();
        let queue = b.queue.max(1);
        tokio::spawn(async move {
            if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                connection(ws, routes, queue).await;
            }
        });
    }
}

async fn connection(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    routes: Routes,
    queue: usize,
) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(queue);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            // What else is queued goes out with it, then one flush.
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut mine = Vec::new();
    // The connection's own copy of the routes it used, so that the shared
    // map is locked once per destination, not once per packet.
    let mut cache: HashMap<DestHash, mpsc::Sender<Message>> = HashMap::new();
    while let Some(Ok(m)) = stream.next().await {
        match m {
            Message::Binary(p) => {
                let Ok(dest) = meshwhisper_behaviour::packet::destination(
                    &p,
                    meshwhisper_behaviour::packet::DEFAULT_MAX_PACKET,
                ) else {
                    continue;
                };
                let to = match cache.get(&dest) {
                    Some(t) if !t.is_closed() => Some(t.clone()),
                    _ => {
                        let t = routes.lock().ok().and_then(|r| r.get(&dest).cloned());
                        if let Some(t) = &t {
                            cache.insert(dest, t.clone());
                        }
                        t
                    }
                };
                if let Some(to) = to {
                    let _ = to.send(Message::Binary(p)).await;
                }
            }
            Message::Text(t) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                    continue;
                };
                if v["type"] != "hello" {
                    continue;
                }
                let hashes = v["destHashes"].as_array().cloned().unwrap_or_default();
                if let Ok(mut r) = routes.lock() {
                    for h in hashes.iter().filter_map(|h| h.as_str()) {
                        if let Some(d) = DestHash::from_hex(h) {
                            r.insert(d, tx.clone());
                            mine.push(d);
                        }
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    if let Ok(mut r) = routes.lock() {
        for d in mine {
            if r.get(&d).is_some_and(|t| t.same_channel(&tx)) {
                r.remove(&d);
            }
        }
    }
    // Other connections may still hold a sender for this one: stop the
    // writer rather than wait for them to drop it.
    writer.abort();
}
