//! Media, archives, push registrations and the address book.

mod common;
use common::*;
use meshwhisper_crypto::address_record::{AddressRecord, Contents};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::primitives::X25519Public;
use meshwhisper_storage::Error;
use meshwhisper_storage::address_book::Upsert;
use meshwhisper_storage::media::MediaId;
use meshwhisper_storage::push::Registration;

#[tokio::test]
async fn media_streams_expires_and_leaves_nothing_on_failure() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| {
        c.media_max_bytes = 10_000;
        c.media_ttl_ms = 1_000;
    })
    .await;
    let m = store.media();
    let mut up = m.begin().await.expect("begin");
    for i in 0..10u8 {
        up.write(&[i; 1000]).await.expect("write");
    }
    let meta = up.finish(NOW).await.expect("finish");
    assert_eq!(meta.size, 10_000);
    assert_eq!(meta.id.as_str().len(), 32);
    assert_eq!(meta.expires_ms, NOW + 1_000);
    let back = m.get(&meta.id, NOW).await.expect("get").expect("found");
    assert_eq!(back.len(), 10_000);
    assert_eq!(&back[1000..1002], &[1, 1]);

    // Over the limit: refused, and no file or row remains.
    let mut up = m.begin().await.expect("begin");
    up.write(&[0; 9_000]).await.expect("write");
    assert!(matches!(
        up.write(&[0; 1_001]).await,
        Err(Error::TooLarge { .. })
    ));
    drop(up);
    // Abandoned mid-way: nothing remains either.
    let mut up = m.begin().await.expect("begin");
    up.write(b"partial").await.expect("write");
    drop(up);
    assert!(
        files_in(&dir, "tmp").is_empty(),
        "{:?}",
        files_in(&dir, "tmp")
    );
    assert_eq!(files_in(&dir, "media"), vec![meta.id.to_string()]);
    assert_eq!(m.count().await.expect("count"), 1);

    // Unknown and malformed ids.
    assert!(MediaId::parse("xyz").is_none());
    assert!(MediaId::parse(&"A".repeat(32)).is_none());
    let unknown = MediaId::parse(&"0".repeat(32)).expect("id");
    assert!(m.get(&unknown, NOW).await.expect("get").is_none());

    // Expiry removes row and file.
    assert!(m.get(&meta.id, NOW + 1_000).await.expect("get").is_none());
    assert_eq!(store.sweep(NOW + 1_000, 10).await.expect("sweep").media, 1);
    assert!(files_in(&dir, "media").is_empty());
    assert_eq!(m.count().await.expect("count"), 0);
}

#[tokio::test]
async fn orphaned_media_files_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let kept = store.media().put(b"kept", NOW).await.expect("put");
    store.close().await;
    let orphan = "f".repeat(32);
    std::fs::write(dir.path().join("media").join(&orphan), b"orphan").expect("write");
    std::fs::write(dir.path().join("tmp").join("x.part"), b"partial").expect("write");
    let store = open(&dir).await;
    assert_eq!(files_in(&dir, "media"), vec![kept.id.to_string()]);
    assert!(files_in(&dir, "tmp").is_empty());
    assert_eq!(
        store
            .media()
            .get(&kept.id, NOW)
            .await
            .expect("get")
            .as_deref(),
        Some(&b"kept"[..])
    );
}

#[tokio::test]
async fn archives_pin_their_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.archive_max_bytes = 1000).await;
    let a = store.archive();
    let owner = [7u8; 32];
    assert!(a.get(owner, NOW).await.expect("get").is_none());
    assert_eq!(a.put(owner, "tok", b"v1", NOW).await.expect("put"), 2);
    assert!(matches!(
        a.put(owner, "other", b"evil", NOW).await,
        Err(Error::Unauthorized { .. })
    ));
    assert!(matches!(
        a.put(owner, "", b"evil", NOW).await,
        Err(Error::Unauthorized { .. })
    ));
    assert!(matches!(
        a.put(owner, "tok", &[0; 1001], NOW).await,
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        a.get(owner, NOW).await.expect("get").as_deref(),
        Some(&b"v1"[..])
    );
    a.put(owner, "tok", b"v2", NOW).await.expect("put");
    assert_eq!(
        a.get(owner, NOW).await.expect("get").as_deref(),
        Some(&b"v2"[..])
    );
    // Old versions and failed writes leave no files behind.
    assert_eq!(files_in(&dir, "archive").len(), 1);
    // The wrong token is refused before any byte is written.
    assert!(matches!(
        a.begin(owner, "other").await,
        Err(Error::Unauthorized { .. })
    ));
    assert!(files_in(&dir, "tmp").is_empty());
    // Archives expire after long inactivity; a read counts as activity.
    let day = 24 * 3_600_000;
    a.put([8u8; 32], "t8", b"other", NOW).await.expect("put");
    assert!(
        a.get([8u8; 32], NOW + 2 * day)
            .await
            .expect("get")
            .is_some()
    );
    assert_eq!(a.expire(NOW + day, 100).await.expect("expire"), 1);
    assert!(
        a.get(owner, NOW).await.expect("get").is_none(),
        "idle since NOW"
    );
    assert!(
        a.get([8u8; 32], NOW).await.expect("get").is_some(),
        "read later"
    );
    assert_eq!(files_in(&dir, "archive").len(), 1);
    assert!(files_in(&dir, "tmp").is_empty());
    assert_eq!(a.count().await.expect("count"), 1);
}

#[tokio::test]
async fn push_registrations_persist() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let p = store.push();
    let reg = Registration {
        platform: "fcm".into(),
        token: "tok".into(),
        topic: None,
        subscription: None,
    };
    p.register(vec![dest(1), dest(2)], reg.clone(), NOW)
        .await
        .expect("register");
    assert!(matches!(
        p.register(
            vec![dest(3)],
            Registration {
                platform: "sms".into(),
                ..reg.clone()
            },
            NOW
        )
        .await,
        Err(Error::Invalid { .. })
    ));
    store.close().await;
    let store = open(&dir).await;
    let p = store.push();
    assert_eq!(p.get(dest(2)).await.expect("get"), Some(reg));
    assert_eq!(p.count().await.expect("count"), 2);
    assert!(p.remove(dest(2)).await.expect("remove"));
    assert!(!p.remove(dest(2)).await.expect("remove"));
    assert!(p.get(dest(3)).await.expect("get").is_none());
}

fn record(seed: u8, ts: u64) -> AddressRecord {
    AddressRecord::sign(
        &IdentityKeyPair::from_seed(&[seed; 32]),
        Contents {
            timestamp_ms: ts,
            onion_key: X25519Public([seed; 32]),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{seed}").into_bytes()],
            anchors: vec![],
        },
    )
    .expect("sign")
}

#[tokio::test]
async fn address_book_last_writer_wins_pages_and_cap() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.address_book_max = 3).await;
    let b = store.address_book();
    assert_eq!(
        b.upsert(&record(1, 100), NOW).await.expect("u"),
        Upsert::Inserted
    );
    assert_eq!(
        b.upsert(&record(1, 50), NOW).await.expect("u"),
        Upsert::Unchanged
    );
    assert_eq!(
        b.upsert(&record(1, 100), NOW).await.expect("u"),
        Upsert::Unchanged
    );
    assert_eq!(
        b.upsert(&record(1, 200), NOW).await.expect("u"),
        Upsert::Replaced
    );
    let key1 = record(1, 0).relay_key().to_bytes();
    assert_eq!(
        b.get(&key1).await.expect("g").expect("f").timestamp_ms(),
        200
    );
    b.upsert(&record(2, 300), NOW).await.expect("u");
    b.upsert(&record(3, 150), NOW).await.expect("u");
    // Full: an older record than every stored one is refused...
    assert!(matches!(
        b.upsert(&record(4, 10), NOW).await,
        Err(Error::BookFull { max: 3 })
    ));
    // ...a newer one displaces the oldest (relay 3 at 150).
    assert_eq!(
        b.upsert(&record(5, 400), NOW).await.expect("u"),
        Upsert::Inserted
    );
    assert_eq!(b.count().await.expect("c"), 3);
    assert!(
        b.get(&record(3, 0).relay_key().to_bytes())
            .await
            .expect("g")
            .is_none()
    );

    // Paging in key order covers everything exactly once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = b.digest(after, 2).await.expect("digest");
        if page.is_empty() {
            break;
        }
        after = page.last().map(|(k, _)| *k);
        seen.extend(page);
    }
    assert_eq!(seen.len(), 3);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    let full = b.page(None, 10).await.expect("page");
    assert_eq!(
        full.iter()
            .map(|r| r.relay_key().to_bytes())
            .collect::<Vec<_>>(),
        seen.iter().map(|(k, _)| *k).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn writes_that_add_data_are_refused_before_the_disk_is_full() {
    let dir = tempfile::tempdir().expect("tmp");
    // A reserve larger than any disk: everything that adds data is refused.
    let store = open_with(&dir, |c| c.min_free_bytes = u64::MAX).await;
    assert!(matches!(
        store.media().put(b"blob", NOW).await,
        Err(Error::DiskFull { .. })
    ));
    assert!(matches!(
        store
            .mailbox()
            .enqueue(
                meshwhisper_crypto::destination::DestHash([1; 8]),
                vec![0; 40],
                NOW
            )
            .await,
        Err(Error::DiskFull { .. })
    ));
    assert!(matches!(
        store.archive().put([1; 32], "t", b"x", NOW).await,
        Err(Error::DiskFull { .. })
    ));
    assert!(store.free_bytes().is_some_and(|b| b > 0));
    store.close().await;
    let store = open_with(&dir, |c| c.min_free_bytes = 0).await;
    store.media().put(b"blob", NOW).await.expect("no reserve");
    store.close().await;
}
