//! Mailbox: order, caps, expiry, bounds, and restarts.

mod common;
use common::*;
use meshwhisper_storage::{Error, mailbox::MailboxId};

#[tokio::test]
async fn enqueue_list_delete_in_arrival_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let mb = store.mailbox();
    let mut ids = Vec::new();
    for i in 0..10u8 {
        let d = dest(u64::from(i % 2));
        ids.push(
            mb.enqueue(d, vec![i; 40], NOW + u64::from(i))
                .await
                .expect("enqueue")
                .id,
        );
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids grow in arrival order"
    );
    let both = mb
        .pending(&[dest(0), dest(1)], NOW, 100)
        .await
        .expect("pending");
    assert_eq!(
        both.iter().map(|p| p.packet[0]).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u8>>()
    );
    let evens = mb.pending(&[dest(0)], NOW, 100).await.expect("pending");
    assert_eq!(
        evens.iter().map(|p| p.packet[0]).collect::<Vec<_>>(),
        vec![0, 2, 4, 6, 8]
    );
    assert_eq!(evens[0].received_ms, NOW);
    assert_eq!(
        mb.pending(&[dest(0), dest(1)], NOW, 3)
            .await
            .expect("p")
            .len(),
        3
    );
    assert_eq!(
        mb.delete(vec![ids[0], ids[1], MailboxId(99_999)])
            .await
            .expect("delete"),
        2
    );
    assert_eq!(mb.count().await.expect("count"), 8);
    assert_eq!(mb.count_for(dest(0)).await.expect("count"), 4);
    assert!(mb.pending(&[dest(7)], NOW, 10).await.expect("p").is_empty());
}

#[tokio::test]
async fn per_hash_cap_drops_oldest_and_counts() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.mailbox_max_per_dest = 5).await;
    let mb = store.mailbox();
    let mut evicted = 0;
    for i in 0..12u8 {
        evicted += mb
            .enqueue(dest(1), vec![i], NOW)
            .await
            .expect("enqueue")
            .evicted;
    }
    mb.enqueue(dest(2), vec![99], NOW).await.expect("enqueue");
    assert_eq!(evicted, 7);
    assert_eq!(mb.evicted_total(), 7);
    let left = mb.pending(&[dest(1)], NOW, 100).await.expect("pending");
    assert_eq!(
        left.iter().map(|p| p.packet[0]).collect::<Vec<_>>(),
        vec![7, 8, 9, 10, 11]
    );
    assert_eq!(mb.count_for(dest(2)).await.expect("count"), 1);

    // Concurrent enqueues (one group commit) respect the cap too.
    let tasks: Vec<_> = (0..50u8)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.mailbox().enqueue(dest(3), vec![i], NOW).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("enqueue");
    }
    assert_eq!(mb.count_for(dest(3)).await.expect("count"), 5);
    // The cap survives a restart (counts are reloaded from the database).
    store.close().await;
    let store = open_with(&dir, |c| c.mailbox_max_per_dest = 5).await;
    let r = store
        .mailbox()
        .enqueue(dest(1), vec![12], NOW)
        .await
        .expect("enqueue");
    assert_eq!(r.evicted, 1);
    assert_eq!(store.mailbox().count_for(dest(1)).await.expect("count"), 5);
}

#[tokio::test]
async fn expiry_is_bounded_per_call() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.mailbox_ttl_ms = 1000).await;
    let mb = store.mailbox();
    for i in 0..25u64 {
        mb.enqueue(dest(i), vec![1], NOW).await.expect("enqueue");
    }
    mb.enqueue(dest(100), vec![2], NOW + 5000)
        .await
        .expect("enqueue");
    // Not yet expired at NOW + 999.
    assert_eq!(mb.expire(NOW + 999, 100).await.expect("expire"), 0);
    assert!(
        mb.pending(&[dest(0)], NOW + 1000, 10)
            .await
            .expect("p")
            .is_empty(),
        "expired packets are not listed"
    );
    assert_eq!(mb.expire(NOW + 1000, 10).await.expect("expire"), 10);
    let report = store.sweep(NOW + 1000, 10).await.expect("sweep");
    assert_eq!(report.mailbox, 10);
    assert!(report.more);
    let report = store.sweep(NOW + 1000, 10).await.expect("sweep");
    assert_eq!(report.mailbox, 5);
    assert!(!report.more);
    assert_eq!(mb.count().await.expect("count"), 1);
}

#[tokio::test]
async fn oversize_packet_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let max = store.config().max_packet_bytes;
    store
        .mailbox()
        .enqueue(dest(1), vec![0; max], NOW)
        .await
        .expect("at the limit");
    let err = store
        .mailbox()
        .enqueue(dest(1), vec![0; max + 1], NOW)
        .await
        .expect_err("over the limit");
    assert!(
        matches!(err, Error::TooLarge { got, .. } if got == max as u64 + 1),
        "{err}"
    );
    assert!(err.to_string().contains("max_packet_bytes"), "{err}");
    assert_eq!(store.mailbox().count().await.expect("count"), 1);
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let id = store
        .mailbox()
        .enqueue(dest(5), b"kept".to_vec(), NOW)
        .await
        .expect("e")
        .id;
    store.close().await;
    assert!(matches!(
        store
            .mailbox()
            .enqueue(dest(5), b"late".to_vec(), NOW)
            .await,
        Err(Error::Closed)
    ));
    let store = open(&dir).await;
    let p = store
        .mailbox()
        .pending(&[dest(5)], NOW, 10)
        .await
        .expect("pending");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].id, id);
    assert_eq!(p[0].packet, b"kept");
}

#[tokio::test]
async fn full_disk_is_a_typed_error_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.max_db_bytes = Some(400 * 1024)).await;
    let mb = store.mailbox();
    let mut acked = 0u64;
    let err = loop {
        match mb
            .enqueue(dest(acked % 7), vec![0xAB; 16 * 1024], NOW)
            .await
        {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 1000, "the size cap never triggered");
    };
    assert!(matches!(err, Error::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().contains("meshwhisper.db"), "{err}");
    // Every acknowledged packet is there, the refused one is not.
    assert_eq!(mb.count().await.expect("count"), acked);
    // Deleting frees space, and the store keeps working.
    let some: Vec<_> = mb
        .pending(&[dest(0), dest(1), dest(2)], NOW, 10)
        .await
        .expect("pending")
        .into_iter()
        .map(|p| p.id)
        .collect();
    mb.delete(some).await.expect("delete");
    mb.enqueue(dest(1), vec![1; 1024], NOW)
        .await
        .expect("works again");
}

#[tokio::test]
async fn enqueue_many_is_ordered_and_all_or_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.mailbox_max_per_dest = 4).await;
    let mb = store.mailbox();
    let batch: Vec<_> = (0..6u8)
        .map(|i| (dest(u64::from(i % 2)), vec![i; 10]))
        .collect();
    let r = mb.enqueue_many(batch, NOW).await.expect("enqueue many");
    assert_eq!(r.len(), 6);
    assert!(r.windows(2).all(|w| w[0].id < w[1].id));
    let got = mb
        .pending(&[dest(0), dest(1)], NOW, 100)
        .await
        .expect("pending");
    assert_eq!(
        got.iter().map(|p| p.packet[0]).collect::<Vec<_>>(),
        (0..6).collect::<Vec<u8>>()
    );
    // The cap applies across the batch: 3 more for hash 0 make 6 > 4.
    let r = mb
        .enqueue_many((10..13u8).map(|i| (dest(0), vec![i])).collect(), NOW)
        .await
        .expect("enqueue many");
    assert_eq!(r.iter().map(|e| e.evicted).sum::<u32>(), 2);
    assert_eq!(mb.count_for(dest(0)).await.expect("count"), 4);
    // One oversize packet refuses the whole batch.
    let max = store.config().max_packet_bytes;
    let before = mb.count().await.expect("count");
    let bad = vec![(dest(5), vec![1u8; 8]), (dest(5), vec![0u8; max + 1])];
    assert!(matches!(
        mb.enqueue_many(bad, NOW).await,
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(mb.count().await.expect("count"), before);
    assert!(
        mb.enqueue_many(Vec::new(), NOW)
            .await
            .expect("empty")
            .is_empty()
    );
}

#[tokio::test]
async fn cap_counts_follow_deletes_and_expiry() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| {
        c.mailbox_max_per_dest = 5;
        c.mailbox_ttl_ms = 1_000;
    })
    .await;
    let mb = store.mailbox();
    let mut ids = Vec::new();
    for i in 0..5u8 {
        ids.push(mb.enqueue(dest(1), vec![i], NOW).await.expect("enqueue").id);
    }
    // Concurrent deletes are merged into one statement; counts stay exact.
    let (a, b) = tokio::join!(
        mb.delete(vec![ids[0]]),
        mb.delete(vec![ids[1], MailboxId(-5)])
    );
    assert_eq!((a.expect("delete"), b.expect("delete")), (1, 1));
    for i in 5..7u8 {
        assert_eq!(
            mb.enqueue(dest(1), vec![i], NOW)
                .await
                .expect("enqueue")
                .evicted,
            0
        );
    }
    assert_eq!(
        mb.enqueue(dest(1), vec![7], NOW)
            .await
            .expect("enqueue")
            .evicted,
        1
    );
    // Expiry frees room too.
    mb.expire(NOW + 1_000, 100).await.expect("expire");
    for i in 0..5u8 {
        assert_eq!(
            mb.enqueue(dest(1), vec![i], NOW + 2_000)
                .await
                .expect("enqueue")
                .evicted,
            0
        );
    }
    assert_eq!(mb.count_for(dest(1)).await.expect("count"), 5);
}

/// The hot tier (see `storage/src/hot.rs`): packets live in the log until
/// the next spill. A copy of the files taken while the store runs — what a
/// crash leaves — recovers exactly the undelivered packets, in order, and
/// a graceful close leaves the log empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_log_recovers_undelivered_packets_and_no_deleted_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::from_secs(3600)).await;
    let mb = store.mailbox();
    let mut ids = Vec::new();
    for i in 0..5u8 {
        ids.push(
            mb.enqueue(dest(1), vec![i; 100], NOW)
                .await
                .expect("enqueue")
                .id,
        );
    }
    assert_eq!(mb.delete(vec![ids[1], ids[3]]).await.expect("delete"), 2);
    assert_eq!(mb.count().await.expect("count"), 3);
    let pending = mb.pending(&[dest(1)], NOW, 10).await.expect("pending");
    assert_eq!(
        pending.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[4]]
    );
    // Nothing of it is in SQLite yet: it is all in the log.
    let db = dir.path().join(meshwhisper_storage::DB_FILE);
    let log = std::path::PathBuf::from(format!("{}-hot.log", db.display()));
    assert!(std::fs::metadata(&log).expect("log").len() > 500);

    // "Crash": copy the files as they are now, and open the copy.
    let copy = tempfile::tempdir().expect("tmp");
    for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), copy.path().join(f.file_name())).expect("copy");
        }
    }
    let recovered = open(&copy).await;
    let p = recovered
        .mailbox()
        .pending(&[dest(1)], NOW, 10)
        .await
        .expect("pending");
    assert_eq!(
        p.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[4]]
    );
    assert_eq!(p[1].packet, vec![2u8; 100]);
    // New ids continue after the recovered ones.
    let next = recovered
        .mailbox()
        .enqueue(dest(1), vec![9], NOW)
        .await
        .expect("enqueue")
        .id;
    assert!(next > ids[4]);
    recovered.close().await;

    // A graceful close moves what is left into SQLite and empties the log.
    store.close().await;
    assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
    let reopened = open(&dir).await;
    assert_eq!(reopened.mailbox().count().await.expect("count"), 3);
}

/// With no hot period every group spills: packets are in SQLite when the
/// enqueue returns and the log stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_log_spills_into_sqlite() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::ZERO).await;
    let mb = store.mailbox();
    let a = mb
        .enqueue(dest(2), b"one".to_vec(), NOW)
        .await
        .expect("enqueue")
        .id;
    let b = mb
        .enqueue(dest(2), b"two".to_vec(), NOW)
        .await
        .expect("enqueue")
        .id;
    assert!(b > a);
    let db = dir.path().join(meshwhisper_storage::DB_FILE);
    let log = std::path::PathBuf::from(format!("{}-hot.log", db.display()));
    assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
    // Readable straight from SQLite, as the packets' own ids.
    use sqlx::Connection as _;
    let mut c = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .read_only(true),
    )
    .await
    .expect("open");
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM mailbox ORDER BY id")
        .fetch_all(&mut c)
        .await
        .expect("ids");
    assert_eq!(ids, vec![a.0, b.0]);
    assert_eq!(mb.delete(vec![a]).await.expect("delete"), 1);
    assert_eq!(mb.count().await.expect("count"), 1);
}

/// Ids of packets delivered while hot are never handed out again, even
/// after a restart (a stale acknowledgement must not hit a newer packet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_not_reused_after_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::from_secs(3600)).await;
    let mb = store.mailbox();
    let _a = mb
        .enqueue(dest(3), b"a".to_vec(), NOW)
        .await
        .expect("enqueue");
    let c = mb
        .enqueue(dest(3), b"c".to_vec(), NOW)
        .await
        .expect("enqueue")
        .id;
    assert_eq!(mb.delete(vec![c]).await.expect("delete"), 1);
    store.close().await;
    let store = open(&dir).await;
    let next = store
        .mailbox()
        .enqueue(dest(3), b"d".to_vec(), NOW)
        .await
        .expect("enqueue")
        .id;
    assert!(next > c, "id {next:?} reused (deleted packet had {c:?})");
}

/// A federated id is remembered (a resend is a duplicate) until its sender
/// says it may be forgotten, whether the id is still in memory or already
/// spilled into the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_federated_ids_are_no_longer_duplicates() {
    use meshwhisper_storage::mailbox::Federated;
    for spill in [
        std::time::Duration::from_secs(3600),
        std::time::Duration::ZERO,
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open_with(&dir, |c| c.hot_spill = spill).await;
        let mb = store.mailbox();
        let fed = |id: u8| Federated {
            dest: dest(7),
            packet: bytes::Bytes::from(vec![id; 40]),
            id: [id; 16],
            remember_until_ms: NOW + 3_600_000,
            unlogged: false,
        };
        let dup = |r: (
            Vec<meshwhisper_storage::mailbox::Enqueued>,
            meshwhisper_storage::mailbox::Settled,
        )|
         -> Vec<bool> { r.0.iter().map(|e| e.duplicate).collect() };
        let first = mb
            .enqueue_federated(vec![fed(1), fed(2)], NOW)
            .await
            .expect("enqueue");
        assert_eq!(dup(first), vec![false, false], "spill {spill:?}");
        let again = mb
            .enqueue_federated(vec![fed(1), fed(2)], NOW)
            .await
            .expect("enqueue");
        assert_eq!(dup(again), vec![true, true], "spill {spill:?}");
        assert_eq!(mb.forget_federated(vec![[1; 16]]).await.expect("forget"), 1);
        let after = mb
            .enqueue_federated(vec![fed(1), fed(2)], NOW)
            .await
            .expect("enqueue");
        assert_eq!(dup(after), vec![false, true], "spill {spill:?}");
    }
}

/// A drain pages through a queue with a cursor (`after`): each page holds
/// what follows the previous one, from both tiers in id order, nothing
/// skipped and nothing twice, and in-flight ids are still left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_after_a_cursor_span_both_tiers_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut ids = Vec::new();
    // Five packets in SQLite (every group spills), then five hot ones.
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::ZERO).await;
    for i in 0..5u8 {
        let mb = store.mailbox();
        ids.push(
            mb.enqueue(dest(u64::from(i % 2)), vec![i; 40], NOW)
                .await
                .expect("enqueue")
                .id,
        );
    }
    store.close().await;
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::from_secs(3600)).await;
    let mb = store.mailbox();
    for i in 5..10u8 {
        ids.push(
            mb.enqueue(dest(u64::from(i % 2)), vec![i; 40], NOW)
                .await
                .expect("enqueue")
                .id,
        );
    }
    let both = [dest(0), dest(1)];
    let page = |after: MailboxId, limit: u32| {
        let mb = store.mailbox();
        async move {
            mb.pending_within(&both, after, NOW, limit, usize::MAX, &|_| false)
                .await
                .expect("page")
                .iter()
                .map(|p| p.packet[0])
                .collect::<Vec<u8>>()
        }
    };
    assert_eq!(page(MailboxId(0), 4).await, vec![0, 1, 2, 3]);
    assert_eq!(page(ids[3], 4).await, vec![4, 5, 6, 7], "across the tiers");
    assert_eq!(page(ids[7], 4).await, vec![8, 9]);
    assert!(page(ids[9], 4).await.is_empty());
    // In flight: skipped, the cursor notwithstanding.
    let skip = |id: MailboxId| id == ids[5] || id == ids[1];
    let left: Vec<u8> = mb
        .pending_within(&both, ids[0], NOW, 100, usize::MAX, &skip)
        .await
        .expect("page")
        .iter()
        .map(|p| p.packet[0])
        .collect();
    assert_eq!(left, vec![2, 3, 4, 6, 7, 8, 9]);
    // One hash only, after a cursor.
    let evens: Vec<u8> = mb
        .pending_within(&[dest(0)], ids[2], NOW, 100, usize::MAX, &|_| false)
        .await
        .expect("page")
        .iter()
        .map(|p| p.packet[0])
        .collect();
    assert_eq!(evens, vec![4, 6, 8]);
}

/// Paging a long queue in SQLite, one index range per hash: pages come in
/// id order across the hashes, every packet exactly once, and a page whose
/// every id is in flight does not end the drain early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_a_long_stored_queue_takes_every_packet_once_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open_with(&dir, |c| c.hot_spill = std::time::Duration::ZERO).await;
    let mb = store.mailbox();
    let mut ids = Vec::new();
    // Three hashes, interleaved unevenly: 0, 1, 2, 0, 0, 1, 2, 0, 0, ...
    for i in 0..120u32 {
        let h = [0u64, 1, 2, 0, 0][i as usize % 5];
        ids.push(
            mb.enqueue(dest(h), i.to_be_bytes().to_vec(), NOW)
                .await
                .expect("enqueue")
                .id,
        );
    }
    let hashes = [dest(0), dest(1), dest(2), dest(9)];
    // In flight already: a run longer than a hash's range on one page.
    let busy: std::collections::HashSet<MailboxId> = ids[10..40].iter().copied().collect();
    let mut got = Vec::new();
    let mut after = MailboxId(0);
    for _ in 0..100 {
        let page = mb
            .pending_within(&hashes, after, NOW, 10, usize::MAX, &|id| {
                busy.contains(&id)
            })
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = page.last().expect("non-empty").id;
        got.extend(page.iter().map(|p| p.id));
    }
    let want: Vec<MailboxId> = ids.iter().copied().filter(|i| !busy.contains(i)).collect();
    assert_eq!(got, want);
}

/// The files of a running store, copied as a crash would leave them.
fn crash_copy(dir: &tempfile::TempDir) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tmp");
    for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), copy.path().join(f.file_name())).expect("copy");
        }
    }
    copy
}

/// Whether `s` settles within 10 s (it settles in milliseconds when it
/// does; a failure must not hang the suite).
async fn bounded(s: meshwhisper_storage::mailbox::Settled) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(10), s)
        .await
        .unwrap_or(false)
}

fn hot_log_bytes(dir: &tempfile::TempDir) -> Vec<u8> {
    let db = dir.path().join(meshwhisper_storage::DB_FILE);
    std::fs::read(format!("{}-hot.log", db.display())).unwrap_or_default()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A store that spills every `spill` and holds packets unlogged for
/// `unlogged`.
async fn holding(
    dir: &tempfile::TempDir,
    spill: std::time::Duration,
    unlogged: std::time::Duration,
) -> meshwhisper_storage::Store {
    open_with(dir, |c| {
        c.hot_spill = spill;
        c.hot_unlogged = unlogged;
    })
    .await
}

fn unlogged(id: u8) -> meshwhisper_storage::mailbox::Federated {
    meshwhisper_storage::mailbox::Federated {
        dest: dest(9),
        packet: bytes::Bytes::from(vec![0xA0 | id; 64]),
        id: [id; 16],
        remember_until_ms: NOW + 3_600_000,
        unlogged: true,
    }
}

/// A packet another relay holds until we acknowledge it, delivered
/// before its time is up, is never written: only its id is, and the
/// enqueue settles once it is delivered. The id outlives a crash (a
/// resend is a duplicate); the packet is not brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlogged_packet_delivered_first_is_never_written() {
    use futures::FutureExt as _;
    let dir = tempfile::tempdir().expect("tmp");
    let store = holding(
        &dir,
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(3600),
    )
    .await;
    let mb = store.mailbox();
    let (enq, mut settled) = mb
        .enqueue_federated(vec![unlogged(1)], NOW)
        .await
        .expect("enqueue");
    let id = enq[0].id;
    // Readers see it (a drain would deliver it) ...
    let p = mb.pending(&[dest(9)], NOW, 10).await.expect("pending");
    assert_eq!(p.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id]);
    // ... and the writer has committed since, but it is not settled.
    mb.enqueue(dest(1), vec![1; 10], NOW)
        .await
        .expect("another");
    assert!(
        (&mut settled).now_or_never().is_none(),
        "settled before delivery"
    );
    assert!(
        !contains(&hot_log_bytes(&dir), &[0xA1; 64]),
        "written unlogged"
    );
    assert_eq!(mb.delete(vec![id]).await.expect("delete"), 1);
    assert!(bounded(settled).await, "delivered: settled");
    assert_eq!(
        store.unlogged_stats(),
        (1, 0),
        "counted as delivered unlogged"
    );
    let log = hot_log_bytes(&dir);
    assert!(
        !contains(&log, &[0xA1; 64]),
        "a delivered packet was written"
    );
    assert!(contains(&log, &[1; 16]), "its id is in the log");
    let copy = crash_copy(&dir);
    let after = open(&copy).await;
    let (again, _) = after
        .mailbox()
        .enqueue_federated(vec![unlogged(1)], NOW)
        .await
        .expect("resend");
    assert!(
        again[0].duplicate,
        "a resend after the crash is a duplicate"
    );
    assert_eq!(
        after.mailbox().count_for(dest(9)).await.expect("count"),
        0,
        "the delivered packet came back"
    );
}

/// An unlogged packet lost in a crash (never acknowledged: it was neither
/// logged nor delivered) leaves no trace: its sender's resend is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlogged_packet_lost_in_a_crash_is_stored_when_resent() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = holding(
        &dir,
        std::time::Duration::ZERO,
        std::time::Duration::from_secs(3600),
    )
    .await;
    let mb = store.mailbox();
    mb.enqueue_federated(vec![unlogged(2)], NOW)
        .await
        .expect("enqueue");
    // Groups that spill (every one here) do not move its id into the
    // table while its packet is unlogged.
    mb.enqueue(dest(1), vec![1; 10], NOW)
        .await
        .expect("another");
    mb.enqueue(dest(1), vec![2; 10], NOW)
        .await
        .expect("another");
    let copy = crash_copy(&dir);
    let after = open(&copy).await;
    let (again, settled) = after
        .mailbox()
        .enqueue_federated(vec![unlogged(2)], NOW)
        .await
        .expect("resend");
    assert!(
        !again[0].duplicate,
        "a lost packet's resend was taken as stored"
    );
    drop(settled);
    assert_eq!(after.mailbox().count_for(dest(9)).await.expect("count"), 1);
}

/// One not delivered in time is logged by the writer on its own (no
/// other work needed) and then survives a crash; a duplicate of one still
/// unlogged logs it at once, so the duplicate's answer never runs ahead
/// of the packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlogged_packet_is_logged_when_due_or_when_resent() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = holding(
        &dir,
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_millis(20),
    )
    .await;
    let mb = store.mailbox();
    let (_, settled) = mb
        .enqueue_federated(vec![unlogged(3)], NOW)
        .await
        .expect("enqueue");
    assert!(bounded(settled).await, "logged when due");
    assert_eq!(
        store.unlogged_stats(),
        (0, 1),
        "counted as logged after all"
    );
    assert!(contains(&hot_log_bytes(&dir), &[0xA3; 64]));
    let copy = crash_copy(&dir);
    assert_eq!(
        open(&copy)
            .await
            .mailbox()
            .count_for(dest(9))
            .await
            .expect("count"),
        1
    );
    drop(store);

    let dir = tempfile::tempdir().expect("tmp");
    let store = holding(
        &dir,
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(3600),
    )
    .await;
    let mb = store.mailbox();
    let (_, first) = mb
        .enqueue_federated(vec![unlogged(4)], NOW)
        .await
        .expect("enqueue");
    let (dup, dup_settled) = mb
        .enqueue_federated(vec![unlogged(4)], NOW)
        .await
        .expect("resend");
    assert!(dup[0].duplicate);
    assert!(bounded(dup_settled).await);
    assert!(
        bounded(first).await,
        "the original is logged with the duplicate"
    );
    assert!(contains(&hot_log_bytes(&dir), &[0xA4; 64]));
}
