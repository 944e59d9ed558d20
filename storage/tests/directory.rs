//! Directory: bundles, usernames and their policies, transfers, one-time
//! prekeys (including concurrent claims), pool tokens.

mod common;
use common::*;
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_storage::Error;
use meshwhisper_storage::directory::{
    Registration, SignedTransferVerifier, TransferAuth, TransferVerifier, UsernamePolicy,
    normalize_username,
};
use std::collections::HashSet;
use std::sync::Arc;

fn verifier() -> Arc<dyn TransferVerifier> {
    Arc::new(SignedTransferVerifier)
}

fn reg(ns: &str, pk: &str, bundle: &[u8], username: Option<&str>) -> Registration {
    Registration {
        namespace: ns.into(),
        public_key: pk.into(),
        bundle: bundle.to_vec(),
        username: username.map(Into::into),
        transfer: None,
    }
}

fn hex_key(id: &IdentityKeyPair) -> String {
    hex::encode(id.public().to_bytes())
}

#[test]
fn usernames_are_normalized_and_checked() {
    assert_eq!(normalize_username("  Alice_1 ").as_deref(), Some("alice_1"));
    assert_eq!(normalize_username("ab"), None);
    assert_eq!(normalize_username(&"a".repeat(31)), None);
    assert_eq!(normalize_username("bad name"), None);
    assert_eq!(normalize_username("émile"), None);
    assert_eq!(normalize_username("ok-name").as_deref(), Some("ok-name"));
}

#[tokio::test]
async fn register_lookup_and_username_rules() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let d = store.directory();
    d.register(reg("ns", "aa", b"bundle-a", Some("Alice")), verifier(), NOW)
        .await
        .expect("a");
    let e = d
        .by_username("ns", "ALICE")
        .await
        .expect("get")
        .expect("found");
    assert_eq!(
        (e.public_key.as_str(), e.bundle.as_slice()),
        ("aa", b"bundle-a".as_slice())
    );
    // Same identity, no username: bundle replaced, username kept.
    d.register(reg("ns", "aa", b"bundle-a2", None), verifier(), NOW)
        .await
        .expect("a2");
    let e = d.by_key("ns", "aa").await.expect("get").expect("found");
    assert_eq!(e.username.as_deref(), Some("alice"));
    assert_eq!(e.bundle, b"bundle-a2");
    // Another identity cannot take it without a transfer; nothing changes.
    let err = d
        .register(reg("ns", "bb", b"bundle-b", Some("alice")), verifier(), NOW)
        .await;
    assert!(matches!(err, Err(Error::UsernameTaken)), "{err:?}");
    assert!(d.by_key("ns", "bb").await.expect("get").is_none());
    // Usernames are per namespace.
    d.register(reg("other", "bb", b"b", Some("alice")), verifier(), NOW)
        .await
        .expect("other ns");
    // Bad input.
    assert!(matches!(
        d.register(reg("ns", "cc", b"c", Some("x")), verifier(), NOW)
            .await,
        Err(Error::Invalid {
            what: "username",
            ..
        })
    ));
    let big = vec![0u8; store.config().bundle_max_bytes + 1];
    assert!(matches!(
        d.register(reg("ns", "cc", &big, None), verifier(), NOW)
            .await,
        Err(Error::TooLarge { .. })
    ));
    assert!(d.by_username("ns", "nobody").await.expect("get").is_none());
    assert_eq!(d.count().await.expect("count"), 2);
}

#[tokio::test]
async fn namespace_policy_first_writer_wins_and_lww_transfers() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let d = store.directory();
    assert_eq!(
        d.policy("ns").await.expect("p"),
        UsernamePolicy::SignedTransfer
    );
    d.set_policy("ns", UsernamePolicy::LastWriterWins)
        .await
        .expect("set");
    d.set_policy("ns", UsernamePolicy::LastWriterWins)
        .await
        .expect("same again");
    assert!(matches!(
        d.set_policy("ns", UsernamePolicy::SignedTransfer).await,
        Err(Error::PolicyConflict {
            current: UsernamePolicy::LastWriterWins
        })
    ));
    d.register(reg("ns", "aa", b"a", Some("bob")), verifier(), NOW)
        .await
        .expect("a");
    d.register(reg("ns", "bb", b"b", Some("bob")), verifier(), NOW)
        .await
        .expect("b takes it");
    assert_eq!(
        d.by_username("ns", "bob")
            .await
            .expect("g")
            .expect("f")
            .public_key,
        "bb"
    );
    assert_eq!(
        d.by_key("ns", "aa").await.expect("g").expect("f").username,
        None
    );
}

#[tokio::test]
async fn signed_transfers_are_verified() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let d = store.directory();
    let alice = IdentityKeyPair::from_seed(&[1u8; 32]);
    let bob = IdentityKeyPair::from_seed(&[2u8; 32]);
    let (ka, kb) = (hex_key(&alice), hex_key(&bob));
    d.register(reg("ns", &ka, b"a", Some("carol")), verifier(), NOW)
        .await
        .expect("alice");
    let expires = NOW + 60_000;
    let msg = SignedTransferVerifier::message("ns", "carol", &kb, expires);
    let good = TransferAuth {
        from_public_key: ka.to_uppercase(),
        expires_at_ms: expires,
        signature: alice.sign(msg.as_bytes()).to_vec(),
    };
    let attempt = |auth: TransferAuth, now: u64| {
        let mut r = reg("ns", &kb, b"b", Some("carol"));
        r.transfer = Some(auth);
        let d = store.directory();
        async move { d.register(r, verifier(), now).await }
    };
    // Signed by the wrong key.
    let mut forged = good.clone();
    forged.signature = bob.sign(msg.as_bytes()).to_vec();
    assert!(matches!(
        attempt(forged, NOW).await,
        Err(Error::TransferRejected(_))
    ));
    // Naming someone else as the holder.
    let mut wrong_from = good.clone();
    wrong_from.from_public_key = kb.clone();
    assert!(matches!(
        attempt(wrong_from, NOW).await,
        Err(Error::TransferRejected(_))
    ));
    // Expired.
    assert!(matches!(
        attempt(good.clone(), expires + 1).await,
        Err(Error::TransferRejected(_))
    ));
    // Tampered expiry.
    let mut later = good.clone();
    later.expires_at_ms += 1;
    assert!(matches!(
        attempt(later, NOW).await,
        Err(Error::TransferRejected(_))
    ));
    assert_eq!(
        d.by_username("ns", "carol")
            .await
            .expect("g")
            .expect("f")
            .public_key,
        ka
    );
    // The real one moves the username.
    attempt(good, NOW).await.expect("transfer");
    assert_eq!(
        d.by_username("ns", "carol")
            .await
            .expect("g")
            .expect("f")
            .public_key,
        kb
    );
    assert_eq!(
        d.by_key("ns", &ka).await.expect("g").expect("f").username,
        None
    );
}

#[tokio::test]
async fn username_race_has_one_winner() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.directory()
                    .register(
                        reg("ns", &format!("key{i}"), b"x", Some("popular")),
                        verifier(),
                        NOW,
                    )
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(()) => wins += 1,
            Err(Error::UsernameTaken) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(store.directory().count().await.expect("count"), 1);
}

#[tokio::test]
async fn one_time_prekeys_caps_claims_and_purge() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let d = store.directory();
    let keys = |from: u8, n: u8| (from..from + n).map(|i| vec![i; 32]).collect::<Vec<_>>();
    assert!(matches!(
        d.add_one_time_prekeys("ns", "aa", keys(0, 21)).await,
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(d.one_time_prekey_count().await.expect("c"), 0);
    for batch in 0..5u8 {
        assert_eq!(
            d.add_one_time_prekeys("ns", "aa", keys(batch * 20, 20))
                .await
                .expect("add"),
            20
        );
    }
    // The pool is full at 100: new keys are not stored, duplicates count.
    assert_eq!(
        d.add_one_time_prekeys("ns", "aa", keys(200, 5))
            .await
            .expect("add"),
        0
    );
    assert_eq!(
        d.add_one_time_prekeys("ns", "aa", keys(0, 3))
            .await
            .expect("add"),
        3
    );
    assert_eq!(
        d.one_time_prekeys_left("ns", "aa").await.expect("left"),
        100
    );
    assert!(matches!(
        d.add_one_time_prekeys("ns", "aa", vec![vec![]]).await,
        Err(Error::TooLarge { .. })
    ));

    // 120 concurrent claims: 100 distinct keys, then none.
    let tasks: Vec<_> = (0..120)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.directory().claim_one_time_prekey("ns", "aa").await })
        })
        .collect();
    let mut got = HashSet::new();
    let mut empty = 0;
    for t in tasks {
        match t.await.expect("join").expect("claim") {
            Some(k) => assert!(got.insert(k), "a key was handed out twice"),
            None => empty += 1,
        }
    }
    assert_eq!((got.len(), empty), (100, 20));

    // Purge: the first token is pinned; another token is refused.
    d.add_one_time_prekeys("ns", "aa", keys(0, 4))
        .await
        .expect("add");
    assert_eq!(
        d.purge_one_time_prekeys("ns", "aa", "secret")
            .await
            .expect("purge"),
        4
    );
    d.add_one_time_prekeys("ns", "aa", keys(0, 2))
        .await
        .expect("add");
    assert!(matches!(
        d.purge_one_time_prekeys("ns", "aa", "guess").await,
        Err(Error::Unauthorized { .. })
    ));
    assert_eq!(d.one_time_prekeys_left("ns", "aa").await.expect("left"), 2);
    // The pin is per identity across namespaces.
    assert!(matches!(
        d.purge_one_time_prekeys("other", "aa", "guess").await,
        Err(Error::Unauthorized { .. })
    ));
    assert_eq!(
        d.purge_one_time_prekeys("ns", "aa", "secret")
            .await
            .expect("purge"),
        2
    );
    assert!(
        d.claim_one_time_prekey("ns", "aa")
            .await
            .expect("claim")
            .is_none()
    );
}
