//! The HTTP API, endpoint by endpoint, positive and malformed, against a
//! relay started in-process on loopback.

mod common;
use base64::Engine as _;
use common::*;
use meshwhisper_crypto::identity::IdentityKeyPair;
use serde_json::json;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A bundle in the JavaScript SDK's 0x02 format: version, flags, IK, SPK,
/// signature of SPK by IK, ML-KEM key.
fn sdk_bundle(id: &IdentityKeyPair, corrupt: bool) -> Vec<u8> {
    let spk = [0x33u8; 32];
    let mut sig = id.sign(&spk);
    if corrupt {
        sig[5] ^= 1;
    }
    let mut b = vec![0x02, 0x00];
    b.extend_from_slice(&id.public().to_bytes());
    b.extend_from_slice(&spk);
    b.extend_from_slice(&sig);
    b.extend_from_slice(&[0x44u8; 1184]);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_cors_and_not_found() {
    let relay = start(|_| {}).await;
    let h = get(&format!("{}/health", relay.base)).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.headers["access-control-allow-origin"], "*");
    let v = h.json();
    for k in [
        "status",
        "clients",
        "storedBlobs",
        "prekeyEntries",
        "pushRegistrations",
        "mediaEntries",
        "opkEntries",
        "archiveEntries",
        "federationPeersConfigured",
        "federationPeersConnected",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert_eq!(v["status"], "ok");

    let nf = get(&format!("{}/nope", relay.base)).await;
    assert_eq!((nf.status, nf.json()), (404, json!({"error": "Not found"})));

    let opt = http("OPTIONS", &format!("{}/directory", relay.base), &[], "").await;
    assert_eq!(opt.status, 204);
    assert_eq!(
        opt.headers["access-control-allow-headers"],
        "Content-Type, Authorization"
    );

    let m = get(&format!("{}/metrics", relay.base)).await;
    assert_eq!(m.status, 200);
    assert!(
        m.headers["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(m.body).expect("utf8");
    for name in [
        "meshwhisper_uptime_seconds",
        "meshwhisper_clients_connected",
        "meshwhisper_stored_blobs",
        "meshwhisper_http_requests_total",
        "meshwhisper_http_responses_total{status=\"4xx\"} 1",
        "meshwhisper_rate_limit_rejections_total{bucket=\"dir\"} 0",
        "meshwhisper_websocket_connections_total",
        "meshwhisper_federation_peers_connected",
        "meshwhisper_federation_forwards_sent_total",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_usernames_transfers_and_bundle_signatures() {
    let relay = start(|_| {}).await;
    let url = format!("{}/directory", relay.base);
    let alice = IdentityKeyPair::from_seed(&[1u8; 32]);
    let bob = IdentityKeyPair::from_seed(&[2u8; 32]);
    let (ka, kb) = (
        hex::encode(alice.public().to_bytes()),
        hex::encode(bob.public().to_bytes()),
    );

    // Malformed requests.
    let r = http("POST", &url, &[], "not json").await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("Invalid JSON body"))
    );
    let r = post_json(&url, json!({"namespace": "ns"})).await;
    assert_eq!(
        r.json()["error"],
        "Missing required fields: namespace, publicKey, bundle"
    );
    let r = post_json(&url, json!({"namespace": "ns", "publicKey": ka, "bundle": b64(&sdk_bundle(&alice, false)), "username": "x!"})).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("Invalid username: 3–30 chars, a–z 0–9 _ -"))
    );
    // A bundle whose signed prekey signature does not verify is refused.
    let r = post_json(
        &url,
        json!({"namespace": "ns", "publicKey": ka, "bundle": b64(&sdk_bundle(&alice, true))}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.json());

    // Register, then look up by key and by username.
    let bundle_a = b64(&sdk_bundle(&alice, false));
    let r = post_json(
        &url,
        json!({"namespace": "ns", "publicKey": ka, "bundle": bundle_a, "username": "Alice"}),
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"ok": true})));
    let r = get(&format!("{url}?namespace=ns&username=alice")).await;
    assert_eq!(
        r.json(),
        json!({"bundle": bundle_a, "publicKey": ka, "username": "alice"})
    );
    let r = get(&format!("{url}?namespace=ns&publicKey={ka}")).await;
    assert_eq!(r.json(), json!({"bundle": bundle_a, "username": "alice"}));
    assert_eq!(
        get(&format!("{url}?namespace=ns&username=nobody"))
            .await
            .json()["error"],
        "User not found"
    );
    assert_eq!(
        get(&format!("{url}?namespace=ns&publicKey=00"))
            .await
            .json()["error"],
        "Prekey bundle not found"
    );
    assert_eq!(
        get(&format!("{url}?username=alice")).await.json()["error"],
        "Missing query param: namespace"
    );
    assert_eq!(
        get(&format!("{url}?namespace=ns")).await.json()["error"],
        "Missing query param: publicKey or username"
    );
    // Nobody can publish a bundle for someone else's key: a bundle whose
    // identity is not the registered publicKey is refused and Alice's entry
    // stays (the attack replaced it, and a username lookup then returned
    // the attacker's key). So are unknown formats, embedded one-time
    // prekeys, wrong lengths and keys that are not 64 hex digits.
    let mallory = IdentityKeyPair::from_seed(&[9u8; 32]);
    let mut embedded = sdk_bundle(&alice, false);
    embedded[1] = 1;
    embedded.extend_from_slice(&[7u8; 32]);
    let mut short = sdk_bundle(&alice, false);
    short.pop();
    for (pk, bundle) in [
        (ka.clone(), sdk_bundle(&mallory, false)),
        (ka.clone(), b"\x09whatever".to_vec()),
        (ka.clone(), embedded),
        (ka.clone(), short),
        ("opaque".to_string(), sdk_bundle(&alice, false)),
    ] {
        let r = post_json(
            &url,
            json!({"namespace": "ns", "publicKey": pk, "bundle": b64(&bundle), "username": "alice"}),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.json());
    }
    let r = get(&format!("{url}?namespace=ns&username=alice")).await;
    assert_eq!(r.json()["publicKey"], ka.as_str());
    assert_eq!(r.json()["bundle"], bundle_a.as_str());

    // Bob cannot take "alice" without a transfer; a forged one is 403; a real one works.
    let bundle_b = b64(&sdk_bundle(&bob, false));
    let r = post_json(
        &url,
        json!({"namespace": "ns", "publicKey": kb, "bundle": bundle_b, "username": "alice"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (
            409,
            Some("Username already claimed by a different identity in this namespace")
        )
    );
    let expires = meshwhisper_node::core::now_ms() + 60_000;
    let msg = format!("meshwhisper.username-transfer.v1\nns\nalice\n{kb}\n{expires}");
    let forged = b64(&bob.sign(msg.as_bytes()));
    let r = post_json(&url, json!({"namespace": "ns", "publicKey": kb, "bundle": bundle_b, "username": "alice", "transferAuth": {"fromPublicKey": ka, "expiresAt": expires, "signature": forged}})).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (
            403,
            Some("transferAuth invalid: signature, expiry, or sender mismatch")
        )
    );
    let r = post_json(&url, json!({"namespace": "ns", "publicKey": kb, "bundle": bundle_b, "username": "alice", "transferAuth": {"fromPublicKey": ka}})).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("Invalid transferAuth shape"))
    );
    let good = b64(&alice.sign(msg.as_bytes()));
    let r = post_json(&url, json!({"namespace": "ns", "publicKey": kb, "bundle": bundle_b, "username": "alice", "transferAuth": {"fromPublicKey": ka, "expiresAt": expires, "signature": good}})).await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(
        get(&format!("{url}?namespace=ns&username=alice"))
            .await
            .json()["publicKey"],
        kb
    );

    // Namespace policy: first writer wins.
    let p = format!("{}/namespace-policy", relay.base);
    assert_eq!(
        get(&format!("{p}?namespace=n2")).await.json(),
        json!({"namespace": "n2", "usernamePolicy": "signed-transfer"})
    );
    let r = post_json(
        &p,
        json!({"namespace": "n2", "usernamePolicy": "last-writer-wins"}),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"ok": true, "usernamePolicy": "last-writer-wins"})
    );
    let r = post_json(
        &p,
        json!({"namespace": "n2", "usernamePolicy": "signed-transfer"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "Namespace policy already set to a different value", "currentPolicy": "last-writer-wins"})
        )
    );
    assert_eq!(
        post_json(&p, json!({"namespace": "n2", "usernamePolicy": "anything"}))
            .await
            .status,
        400
    );
    assert_eq!(get(&p).await.status, 400);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys() {
    let relay = start(|_| {}).await;
    let url = format!("{}/opks", relay.base);
    let owner = IdentityKeyPair::from_seed(&[3u8; 32]);
    let pk = hex::encode(owner.public().to_bytes());
    let claim = format!("{url}/claim?namespace=ns&publicKey={pk}");
    let squatter: std::net::IpAddr = [127, 0, 0, 2].into();
    let upload =
        |keys: Vec<serde_json::Value>| json!({"namespace": "ns", "publicKey": pk, "opks": keys});
    assert_eq!(
        post_json(&url, json!({"namespace": "ns"})).await.json()["error"],
        "Missing required fields: namespace, publicKey, opks[]"
    );
    let r = post_json(
        &url,
        json!({"namespace": "ns", "publicKey": "aa", "opks": [b64(&[1; 32])]}),
    )
    .await;
    assert_eq!(r.status, 400, "keys are 64 hex digits");
    let r = post_json(&url, upload(vec![json!(b64(&[1; 16]))])).await;
    assert_eq!(r.status, 400, "one-time prekeys are 32-byte X25519 keys");

    // Before its bundle (the JS SDK's order at first start), an upload is
    // parked: not claimable. A squatter's parked upload from another
    // address is replaced by the owner's and never promoted.
    let junk = upload(vec![json!(b64(&[0xee; 32]))]).to_string();
    let r = http_from(
        Some(squatter),
        "POST",
        &url,
        &[("content-type", "application/json")],
        junk.clone(),
    )
    .await;
    assert_eq!(r.status, 200);
    // Only the first 20 count; empty and non-string entries are skipped.
    let mut list: Vec<serde_json::Value> = (0..25u8).map(|i| json!(b64(&[i; 32]))).collect();
    list.insert(0, json!(""));
    list.insert(1, json!(5));
    let r = post_json(&url, upload(list)).await;
    assert_eq!(r.json(), json!({"ok": true, "stored": 18}));
    assert_eq!(
        get(&claim).await.status,
        404,
        "parked keys are not claimable"
    );
    // The owner publishes its bundle: its parked keys become the pool.
    let r = post_json(
        &format!("{}/directory", relay.base),
        json!({"namespace": "ns", "publicKey": pk, "bundle": b64(&sdk_bundle(&owner, false))}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json());
    let first = get(&claim).await.json()["opk"]
        .as_str()
        .expect("opk")
        .to_string();
    assert_eq!(first, b64(&[0u8; 32]));
    // Once the bundle is there, only its publisher's address adds keys.
    let r = http_from(
        Some(squatter),
        "POST",
        &url,
        &[("content-type", "application/json")],
        junk,
    )
    .await;
    assert_eq!(r.status, 403, "squatting refused");
    for _ in 0..17 {
        let k = get(&claim).await.json()["opk"]
            .as_str()
            .expect("opk")
            .to_string();
        assert_ne!(k, b64(&[0xee; 32]), "a squatter's key was handed out");
    }
    let r = get(&claim).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("No one-time pre-keys available"))
    );
    assert_eq!(
        get(&format!("{url}/claim?namespace=ns")).await.json()["error"],
        "Missing query params: namespace, publicKey"
    );
    // Purge: bearer required, pinned on first use.
    let r = post_json(&url, upload(vec![json!(b64(&[9; 32]))])).await;
    assert_eq!(r.json(), json!({"ok": true, "stored": 1}));
    let body = json!({"namespace": "ns", "publicKey": pk}).to_string();
    let r = http("DELETE", &url, &[], body.clone()).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("Missing bearer token"))
    );
    let r = http(
        "DELETE",
        &url,
        &[("authorization", "Bearer t1")],
        body.clone(),
    )
    .await;
    assert_eq!(r.json(), json!({"ok": true, "deleted": 1}));
    let r = http(
        "DELETE",
        &url,
        &[("authorization", "Bearer t2")],
        body.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("Invalid OPK pool token"))
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_and_archives() {
    let relay = start(|c| {
        c.storage.max_media_size = 1000;
        c.storage.max_archive_size = 500;
        c.base_url = Some("https://relay.example/".into());
    })
    .await;
    let r = http(
        "POST",
        &format!("{}/media", relay.base),
        &[],
        vec![7u8; 1000],
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(v["url"], format!("https://relay.example/media/{id}"));
    assert!(v["expiresAt"].as_u64().expect("expiresAt") > meshwhisper_node::core::now_ms());
    let g = get(&format!("{}/media/{id}", relay.base)).await;
    assert_eq!((g.status, g.body.len()), (200, 1000));
    assert_eq!(g.headers["cache-control"], "private, max-age=604800");
    let r = http(
        "POST",
        &format!("{}/media", relay.base),
        &[],
        vec![7u8; 1001],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("Payload too large (max 1000 bytes)"))
    );
    assert_eq!(
        get(&format!("{}/media/{}", relay.base, "0".repeat(32)))
            .await
            .json()["error"],
        "Media not found or expired"
    );
    assert_eq!(get(&format!("{}/media/xyz", relay.base)).await.status, 404);

    let a = format!("{}/archive/{}", relay.base, "ab".repeat(32));
    let r = http("PUT", &a, &[], vec![1u8; 10]).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("Missing Authorization header"))
    );
    let r = http("PUT", &a, &[("authorization", "Bearer tok")], vec![1u8; 10]).await;
    assert_eq!(r.json(), json!({"ok": true, "size": 10}));
    let r = http(
        "PUT",
        &a,
        &[("authorization", "Bearer other")],
        vec![2u8; 10],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("Invalid archive token"))
    );
    let r = http(
        "PUT",
        &a,
        &[("authorization", "Bearer tok")],
        vec![2u8; 501],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("Archive too large (max 500 bytes)"))
    );
    let g = get(&a).await;
    assert_eq!((g.status, g.body), (200, vec![1u8; 10]));
    assert_eq!(g.headers["cache-control"], "no-store");
    assert_eq!(
        get(&format!("{}/archive/{}", relay.base, "cd".repeat(32)))
            .await
            .json()["error"],
        "Archive not found"
    );
    let h = get(&format!("{}/health", relay.base)).await.json();
    assert_eq!(
        (h["mediaEntries"].as_u64(), h["archiveEntries"].as_u64()),
        (Some(1), Some(1))
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let relay = start(|c| {
        c.limits.rate_limit_read = 2;
        c.trust_proxy = true;
    })
    .await;
    let url = format!("{}/namespace-policy?namespace=x", relay.base);
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(http("GET", &url, &xff("10.0.0.1"), "").await.status, 200);
    assert_eq!(http("GET", &url, &xff("10.0.0.1"), "").await.status, 200);
    let r = http("GET", &url, &xff("10.0.0.1"), "").await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .expect("s")
        .parse()
        .expect("n");
    assert!((1..=60).contains(&retry));
    assert_eq!(
        r.json(),
        json!({"error": "Too many requests", "retryAfter": retry})
    );
    // Another (trusted, forwarded) client IP has its own window.
    assert_eq!(http("GET", &url, &xff("10.0.0.2"), "").await.status, 200);
    let m = String::from_utf8(get(&format!("{}/metrics", relay.base)).await.body).expect("utf8");
    assert!(
        m.contains("meshwhisper_rate_limit_rejections_total{bucket=\"read\"} 1"),
        "{m}"
    );
    assert!(m.contains("meshwhisper_http_responses_total{status=\"429\"} 1"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_unless_the_proxy_is_trusted() {
    let relay = start(|c| c.limits.rate_limit_read = 1).await;
    let url = format!("{}/namespace-policy?namespace=x", relay.base);
    assert_eq!(
        http("GET", &url, &[("x-forwarded-for", "10.0.0.1")], "")
            .await
            .status,
        200
    );
    // A different claimed IP does not get a fresh window: the socket's IP counts.
    assert_eq!(
        http("GET", &url, &[("x-forwarded-for", "10.0.0.2")], "")
            .await
            .status,
        429
    );
    relay.stop().await;
}
