//! One client cannot deny service to the others: slow readers, slow or
//! idle connections, stalled uploads, registration floods and disk fillers
//! each meet a bound, while a well-behaved client keeps being served.

mod common;
use common::*;
use futures::{SinkExt as _, StreamExt as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

type Raw =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A TCP connection to the relay from `local` (another client address on
/// loopback).
async fn tcp_from(local: IpAddr, base: &str) -> tokio::net::TcpStream {
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .expect("relay address");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(local, 0)).expect("bind");
    sock.connect(addr).await.expect("connect")
}

/// A WebSocket that only reads when the test says so (no pongs otherwise).
async fn raw_ws_from(local: IpAddr, base: &str) -> Raw {
    let tcp = tcp_from(local, base).await;
    let url = format!("{}/", base.replace("http://", "ws://"));
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .expect("ws");
    ws
}

/// Waits (bounded) until metric `name` reaches `at_least`.
async fn wait_metric(base: &str, name: &str, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(base, name).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the relay closed `tcp` within `within` (EOF or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

const OTHER: [u8; 4] = [127, 0, 0, 2];
const R: &str = "1111111111111111";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_a_bounded_queue_and_catches_up_without_asking() {
    let relay = start(|c| {
        c.limits.client_queue_bytes = 512 * 1024;
        c.limits.unconfirmed_bytes = 512 * 1024;
    })
    .await;
    // The reader registers and then reads nothing.
    let mut reader = raw_ws_from(OTHER.into(), &relay.base).await;
    let hello = serde_json::json!({"type": "hello", "destHashes": [R]}).to_string();
    reader
        .send(Message::Text(hello.into()))
        .await
        .expect("hello");
    wait_health(&relay.base, |h| h["clients"] == 1).await;
    // 100 packets of 200 KiB to it (20 MB; the old relay queued up to
    // 1024 of them in memory per reader).
    let mut sender = ws(&relay.ws).await;
    for i in 0..100u32 {
        let mut payload = vec![0u8; 200 * 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        sender
            .send(Message::Binary(packet(R, &payload).into()))
            .await
            .expect("send");
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 100).await;
    let queued = metric(&relay.base, "meshwhisper_live_queue_bytes").await;
    assert!(queued <= 512 * 1024, "live queue holds {queued} bytes");
    assert!(metric(&relay.base, "meshwhisper_live_queue_full_total").await > 0);
    // It starts reading: everything arrives, in order, without a pull.
    let mut next = 0u32;
    while next < 100 {
        let m = tokio::time::timeout(Duration::from_secs(20), reader.next())
            .await
            .expect("no packet in time")
            .expect("open")
            .expect("ok");
        if let Message::Binary(b) = m {
            assert_eq!(u32::from_be_bytes(b[31..35].try_into().expect("4")), next);
            next += 1;
        }
    }
    // Its pongs confirm the deliveries: nothing stays stored.
    let drain = tokio::spawn(async move { while reader.next().await.is_some() {} });
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;
    drain.abort();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_kept_until_the_client_confirms_it() {
    let relay = start(|_| {}).await;
    let mut reader = raw_ws_from(OTHER.into(), &relay.base).await;
    let register = serde_json::json!({"type": "hello", "destHashes": [R]}).to_string();
    reader
        .send(Message::Text(register.into()))
        .await
        .expect("hello");
    wait_health(&relay.base, |h| h["clients"] == 1).await;
    let mut sender = ws(&relay.ws).await;
    for i in 0..5u8 {
        sender
            .send(Message::Binary(packet(R, &[0xa0 + i; 16]).into()))
            .await
            .expect("send");
    }
    // The packets reach the client's socket, but it never answers the
    // pings behind them (it reads the raw bytes, so no pong is sent) and
    // goes away: they stay.
    let mut seen = Vec::new();
    let tcp = match reader.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(t) => t,
        _ => unreachable!("plain TCP"),
    };
    while !(0..5u8).all(|i| seen.windows(16).any(|w| w == [0xa0 + i; 16])) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("packets in time")
            .expect("read");
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(reader);
    wait_health(&relay.base, |h| h["clients"] == 0).await;
    assert_eq!(
        get(&format!("{}/health", relay.base)).await.json()["storedBlobs"],
        5
    );
    // The next session gets them again.
    let mut again = ws(&relay.ws).await;
    hello(&mut again, &[R]).await;
    for i in 0..5u8 {
        assert_eq!(next_packet(&mut again).await[31], 0xa0 + i);
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_capped_per_address() {
    let relay = start(|c| {
        c.limits.header_timeout_secs = 1;
        c.limits.body_idle_timeout_secs = 1;
        c.limits.max_connections_per_ip = 5;
        c.limits.max_websockets_per_ip = 2;
    })
    .await;
    let base = relay.base.clone();
    // Slowloris: half a request, never finished.
    let mut slow = tcp_from(OTHER.into(), &base).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "slowloris"
    );
    // Idle keep-alive after a request.
    let mut idle = tcp_from(OTHER.into(), &base).await;
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)).await,
        "idle keep-alive"
    );
    // A body that stalls.
    let mut stalled = tcp_from(OTHER.into(), &base).await;
    stalled
        .write_all(b"POST /media HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .expect("write");
    assert!(
        closed_within(&mut stalled, Duration::from_secs(5)).await,
        "stalled body"
    );
    // One address gets five connections; the sixth is refused, while
    // another address is served.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tcp_from(OTHER.into(), &base).await);
    }
    let mut sixth = tcp_from(OTHER.into(), &base).await;
    assert!(
        closed_within(&mut sixth, Duration::from_secs(2)).await,
        "over the per-address cap"
    );
    assert_eq!(get(&format!("{base}/health")).await.status, 200);
    drop(held);
    // WebSockets: two per address.
    let third: [u8; 4] = [127, 0, 0, 3];
    let _a = raw_ws_from(third.into(), &base).await;
    let _b = raw_ws_from(third.into(), &base).await;
    let tcp = tcp_from(third.into(), &base).await;
    let refused = tokio_tungstenite::client_async(
        format!("{}/", base.replace("http://", "ws://")),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await;
    assert!(refused.is_err(), "a third WebSocket from one address");
    assert!(metric(&base, "meshwhisper_connections_refused_per_ip_total").await >= 1);
    assert!(metric(&base, "meshwhisper_websockets_refused_per_ip_total").await >= 1);
    assert!(metric(&base, "meshwhisper_connection_timeouts_total").await >= 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_archive_token_is_refused_before_the_body() {
    let relay = start(|_| {}).await;
    let base = relay.base.clone();
    let id = "ab".repeat(32);
    let r = http(
        "PUT",
        &format!("{base}/archive/{id}"),
        &[("authorization", "Bearer owner")],
        vec![1u8; 100],
    )
    .await;
    assert_eq!(r.status, 200);
    // A 12 MB upload with the wrong token: answered before any body byte.
    let mut tcp = tcp_from(OTHER.into(), &base).await;
    tcp.write_all(
        format!(
            "PUT /archive/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer thief\r\nContent-Length: 12000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("answered without the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_crowd_others_out_of_the_homed_table() {
    let relay = start(|c| c.federation.homed_per_ip = 4096).await;
    let running = relay.running.as_ref().expect("running");
    let mut honest = ws(&relay.ws).await;
    hello(&mut honest, &[R]).await;
    wait_health(&relay.base, |h| h["clients"] == 1).await;
    // One address registers 4 × 4096 random hashes.
    let mut flood = raw_ws_from(OTHER.into(), &relay.base).await;
    for round in 0..4u32 {
        let hashes: Vec<String> = (0..4096u32)
            .map(|i| format!("{:08x}{:08x}", round + 7, i))
            .collect();
        let hello = serde_json::json!({"type": "hello", "destHashes": hashes}).to_string();
        flood
            .send(Message::Text(hello.into()))
            .await
            .expect("hello");
    }
    // Each hello after the first evicts the address's own previous share.
    wait_metric(&relay.base, "meshwhisper_homed_evicted_total", 3 * 4096).await;
    let h = get(&format!("{}/health", relay.base)).await.json();
    assert_eq!(h["federation"]["homedHashes"], 4096 + 1, "{h}");
    let r = meshwhisper_crypto::destination::DestHash::from_hex(R).expect("hex");
    assert!(
        running.core.is_homed(&r),
        "the honest client's hash stays homed"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_have_a_daily_quota_per_address_and_the_disk_a_reserve() {
    let relay = start(|c| c.limits.upload_bytes_per_ip_per_day = 100 * 1024).await;
    let media = format!("{}/media", relay.base);
    let ct = [("content-type", "application/octet-stream")];
    assert_eq!(
        http("POST", &media, &ct, vec![1u8; 60 * 1024]).await.status,
        200
    );
    let r = http("POST", &media, &ct, vec![1u8; 60 * 1024]).await;
    assert_eq!(r.status, 507, "over the quota");
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("quota"))
    );
    // Another address has its own quota.
    let r = http_from(
        Some(OTHER.into()),
        "POST",
        &media,
        &ct,
        vec![1u8; 60 * 1024],
    )
    .await;
    assert_eq!(r.status, 200);
    relay.stop().await;

    // No free space above the reserve: nothing that adds data is accepted.
    let relay = start(|c| c.storage.min_free_bytes = u64::MAX).await;
    let r = http("POST", &format!("{}/media", relay.base), &ct, vec![1u8; 10]).await;
    assert_eq!(r.status, 507);
    let mut s = ws(&relay.ws).await;
    s.send(Message::Binary(packet(R, b"x").into()))
        .await
        .expect("send");
    assert_eq!(next_close(&mut s).await.0, 1013);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_bodies_answer_413_as_json_with_cors() {
    let relay = start(|c| c.limits.max_json_body = 1024).await;
    let r = http(
        "POST",
        &format!("{}/directory", relay.base),
        &[("content-type", "application/json")],
        vec![b' '; 4096],
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    assert!(r.json()["error"].is_string());
    relay.stop().await;
}

/// A client storing more than its rate for recipients who are away is
/// moved to the writer's bulk lane (counted), and still loses nothing:
/// the recipient, once back, gets every packet in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_storing_fast_for_absent_recipients_is_paced_and_keeps_its_order() {
    let relay = start(|c| c.limits.client_away_bytes_per_sec = 16 * 1024).await;
    let mut sender = ws(&relay.ws).await;
    let send = |i: u32| {
        let mut payload = vec![0u8; 2 * 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        Message::Binary(packet(R, &payload).into())
    };
    // Within the allowance (8 KiB of 16), one at a time: the main lane.
    for i in 0..4u32 {
        sender.send(send(i)).await.expect("send");
        wait_health(&relay.base, |h| h["storedBlobs"] == i + 1).await;
    }
    assert_eq!(
        metric(&relay.base, "meshwhisper_packets_paced_away_total").await,
        0
    );
    // Then 392 KiB at once: far over it.
    for i in 4..200u32 {
        sender.send(send(i)).await.expect("send");
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 200).await;
    let paced = metric(&relay.base, "meshwhisper_packets_paced_away_total").await;
    assert!(paced > 150, "only {paced} of 196 paced");
    let mut reader = ws(&relay.ws).await;
    hello(&mut reader, &[R]).await;
    for want in 0..200u32 {
        let p = next_packet(&mut reader).await;
        assert_eq!(u32::from_be_bytes(p[31..35].try_into().expect("4")), want);
    }
    relay.stop().await;
}
