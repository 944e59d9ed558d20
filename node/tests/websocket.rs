//! The WebSocket protocol: hello/pull/route, store-then-deliver, drains,
//! exactly-once delivery, close codes, push wake and shutdown.

mod common;
use common::*;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const A: &str = "aaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_deletes_the_stored_copy_and_never_echoes() {
    let relay = start(|_| {}).await;
    let mut alice = ws(&relay.ws).await;
    let mut bob = ws(&relay.ws).await;
    hello(&mut alice, &[A]).await;
    hello(&mut bob, &[B]).await;
    wait_health(&relay.base, |h| h["clients"] == 2).await;
    for i in 0..20u8 {
        alice
            .send(Message::Binary(packet(B, &[i; 50]).into()))
            .await
            .expect("send");
    }
    for i in 0..20u8 {
        let p = next_packet(&mut bob).await;
        assert_eq!(&p[31..], &[i; 50], "in order, unchanged");
    }
    // Stored copies are deleted once sent.
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;
    // A packet to one's own hash is stored, not echoed back.
    alice
        .send(Message::Binary(packet(A, b"self").into()))
        .await
        .expect("send");
    wait_health(&relay.base, |h| h["storedBlobs"] == 1).await;
    bob.send(Message::Binary(packet(A, b"from bob").into()))
        .await
        .expect("send");
    assert_eq!(&next_packet(&mut alice).await[31..], b"from bob");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_packets_drain_on_hello_exactly_once() {
    let relay = start(|_| {}).await;
    let mut alice = ws(&relay.ws).await;
    hello(&mut alice, &[A]).await;
    for i in 0..30u8 {
        alice
            .send(Message::Binary(packet(B, &[i]).into()))
            .await
            .expect("send");
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 30).await;
    let mut bob = ws(&relay.ws).await;
    hello(&mut bob, &[B, "not-a-hash", "CCCCCCCCCCCCCCCC"]).await;
    for i in 0..30u8 {
        assert_eq!(next_packet(&mut bob).await[31], i);
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;
    // A pull finds nothing more: no duplicates.
    bob.send(Message::Text(r#"{"type":"pull"}"#.into()))
        .await
        .expect("pull");
    // Route hints and unknown control types are accepted silently.
    bob.send(Message::Text(
        r#"{"type":"route","destHash":"aaaaaaaaaaaaaaaa","homeRelay":"00"}"#.into(),
    ))
    .await
    .expect("route");
    bob.send(Message::Text(r#"{"type":"future-thing"}"#.into()))
        .await
        .expect("x");
    alice
        .send(Message::Binary(packet(B, b"after").into()))
        .await
        .expect("send");
    assert_eq!(&next_packet(&mut bob).await[31..], b"after");
    // Pull drains what arrived while the hash was not registered here.
    let mut carol = ws(&relay.ws).await;
    hello(&mut carol, &[]).await;
    alice
        .send(Message::Binary(
            packet("cccccccccccccccc", b"for carol").into(),
        ))
        .await
        .expect("send");
    wait_health(&relay.base, |h| h["storedBlobs"] == 1).await;
    hello(&mut carol, &["cccccccccccccccc"]).await;
    assert_eq!(&next_packet(&mut carol).await[31..], b"for carol");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_clear_close_codes() {
    let relay = start(|c| {
        c.storage.max_blob_size = 1000;
        c.limits.max_hashes_per_client = 3;
    })
    .await;
    let base = relay.base.clone();
    // Text that is not JSON is ignored (as the reference does) and
    // counted; the packets behind it are stored and delivered.
    let mut bob = ws(&relay.ws).await;
    hello(&mut bob, &[B]).await;
    wait_health(&base, |h| h["clients"] == 1).await;
    let mut s = ws(&relay.ws).await;
    s.send(Message::Text("{not json".into()))
        .await
        .expect("send");
    s.send(Message::Binary(packet(B, b"after bad json").into()))
        .await
        .expect("send");
    assert_eq!(&next_packet(&mut bob).await[31..], b"after bad json");

    // A packet shorter than its header, of an unknown version, or whose
    // length field is not its size: 1007, nothing stored.
    let mut short = packet(B, b"x");
    short.truncate(30);
    let mut version = packet(B, b"x");
    version[0] = 2;
    let mut length = packet(B, b"xyz");
    length.pop();
    for bad in [short, version, length] {
        let mut s = ws(&relay.ws).await;
        s.send(Message::Binary(bad.into())).await.expect("send");
        assert_eq!(next_close(&mut s).await.0, 1007);
    }

    let mut s = ws(&relay.ws).await;
    s.send(Message::Binary(packet(B, &[0u8; 1000]).into()))
        .await
        .expect("send");
    assert_eq!(next_close(&mut s).await.0, 1009);

    let mut s = ws(&relay.ws).await;
    hello(
        &mut s,
        &[
            "1111111111111111",
            "2222222222222222",
            "3333333333333333",
            "4444444444444444",
        ],
    )
    .await;
    assert_eq!(next_close(&mut s).await.0, 1008);

    // Nothing malformed was stored; the relay still works.
    let h = wait_health(&base, |h| h["storedBlobs"] == 0).await;
    assert_eq!(h["status"], "ok");
    let m = String::from_utf8(get(&format!("{base}/metrics")).await.body).expect("utf8");
    assert!(m.contains("meshwhisper_protocol_closes_total 5"), "{m}");
    assert!(m.contains("meshwhisper_bad_control_frames_total 1"), "{m}");
    assert!(m.contains("meshwhisper_packets_rejected_total 4"), "{m}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_1001_and_keeps_packets() {
    let relay = start(|_| {}).await;
    let mut alice = ws(&relay.ws).await;
    hello(&mut alice, &[A]).await;
    for i in 0..10u8 {
        alice
            .send(Message::Binary(packet(B, &[i]).into()))
            .await
            .expect("send");
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 10).await;
    let dir = {
        let stop = tokio::spawn(relay.stop());
        let (code, reason) = next_close(&mut alice).await;
        assert_eq!((code, reason.as_str()), (1001, "Node shutting down"));
        stop.await.expect("stop")
    };
    // Restart on the same data: the packets are there for Bob, once each.
    let relay = start_in(dir, |_| {}).await;
    let mut bob = ws(&relay.ws).await;
    hello(&mut bob, &[B]).await;
    for i in 0..10u8 {
        assert_eq!(next_packet(&mut bob).await[31], i);
    }
    bob.send(Message::Text(r#"{"type":"pull"}"#.into()))
        .await
        .expect("pull");
    let extra = tokio::time::timeout(Duration::from_millis(300), bob.next()).await;
    assert!(extra.is_err(), "unexpected frame after drain: {extra:?}");
    relay.stop().await;
}

/// A local HTTP receiver standing in for APNs/FCM gateways.
async fn receiver() -> (String, tokio::sync::mpsc::Receiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/wake",
        axum::routing::post(move |body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body).await;
                "ok"
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/wake"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_wake_for_offline_registered_recipients() {
    let (url, mut wakes) = receiver().await;
    let relay = start(move |c| c.push_webhook_url = Some(url)).await;
    let mut bob = ws(&relay.ws).await;
    let reg = serde_json::json!({"type": "hello", "destHashes": [B], "pushPlatform": "fcm", "pushToken": "device-token-1"});
    bob.send(Message::Text(reg.to_string().into()))
        .await
        .expect("hello");
    wait_health(&relay.base, |h| h["pushRegistrations"] == 1).await;
    drop(bob);
    wait_health(&relay.base, |h| h["clients"] == 0).await;
    let mut alice = ws(&relay.ws).await;
    alice
        .send(Message::Binary(packet(B, b"secret content").into()))
        .await
        .expect("send");
    let body = tokio::time::timeout(Duration::from_secs(10), wakes.recv())
        .await
        .expect("wake")
        .expect("body");
    assert_eq!(
        body,
        format!("{{\"token\":\"device-token-1\",\"platform\":\"fcm\",\"destHash\":\"{B}\"}}")
    );
    assert!(!body.contains("secret"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_counts_without_content() {
    use http_body_util::BodyExt as _;
    let relay = start(|_| {}).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: hyper::Uri = format!("{}/events", relay.base).parse().expect("uri");
    let resp = client.get(uri).await.expect("events");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut next = async || -> String {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("event within 10 s")
                .expect("stream open")
                .expect("frame");
            if let Ok(d) = frame.into_data() {
                return String::from_utf8(d.to_vec()).expect("utf8");
            }
        }
    };
    text.push_str(&next().await);
    assert!(text.starts_with(": connected"), "{text}");
    let mut alice = ws(&relay.ws).await;
    hello(&mut alice, &[A]).await;
    alice
        .send(Message::Binary(packet(B, b"queued for bob").into()))
        .await
        .expect("send");
    let data = loop {
        let chunk = next().await;
        if let Some(line) = chunk.lines().find(|l| l.starts_with("data: ")) {
            break line.trim_start_matches("data: ").to_string();
        }
    };
    let v: serde_json::Value = serde_json::from_str(&data).expect("json");
    assert_eq!(
        (v["in"].as_u64(), v["queue"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert!(!data.contains("queued for bob"));
    relay.stop().await;
}
