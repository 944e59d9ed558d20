//! [`Tx`]: the one way the engine opens a transaction on the profile
//! database.
//!
//! Every write that must be atomic with another (a ratchet step with the
//! outbox rows or the received message it produced, a batch of sends, a
//! batch of deliveries, new prekeys with the counter that names them, a
//! claimed session with its activation) happens between [`Tx::begin`] and
//! [`Tx::commit`]. Work spanning several helpers passes the `&mut Tx` down;
//! a helper that takes one says so in its signature. The guard derefs to
//! the connection, so every `db::` function works inside it.
//!
//! The transaction commits only when told to. Dropping the guard
//! uncommitted (an early `?`, a refused batch, a failed commit) rolls it
//! back: the rollback is queued on the connection before the guard is
//! gone, so whatever uses the connection next sees the database as it was
//! before `begin`.

use crate::Error;
use crate::db::Conn;
use sqlx::{Connection as _, Sqlite, Transaction};
use std::ops::{Deref, DerefMut};

/// An open transaction on the profile connection: `BEGIN IMMEDIATE`,
/// committed by [`Tx::commit`], rolled back on drop.
pub(super) struct Tx<'c>(Transaction<'c, Sqlite>);

impl<'c> Tx<'c> {
    /// Begins a transaction. `IMMEDIATE` takes the write lock at once, so
    /// one that reads before it writes cannot fail half way to upgrade its
    /// lock. `what` names the work in the error.
    pub(super) async fn begin(conn: &'c mut Conn, what: &'static str) -> Result<Self, Error> {
        conn.begin_with("BEGIN IMMEDIATE")
            .await
            .map(Self)
            .map_err(|source| Error::Database { what, source })
    }

    /// Commits. When the commit fails, the transaction is rolled back
    /// (nothing of it was written) and the error names `what`.
    pub(super) async fn commit(self, what: &'static str) -> Result<(), Error> {
        self.0
            .commit()
            .await
            .map_err(|source| Error::Database { what, source })
    }
}

impl Deref for Tx<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;

    async fn values(c: &mut Conn) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        for k in ["a", "b"] {
            out.push(db::meta_u64(c, k).await.expect("read"));
        }
        out
    }

    #[tokio::test]
    async fn commits_when_told_and_rolls_back_on_drop() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut conn = db::open(&dir.path().join("p.db")).await.expect("open");

        let mut tx = Tx::begin(&mut conn, "begin").await.expect("begin");
        db::meta_set_u64(&mut tx, "a", 1).await.expect("write");
        tx.commit("commit").await.expect("commit");
        assert_eq!(values(&mut conn).await, [Some(1), None]);

        {
            let mut tx = Tx::begin(&mut conn, "begin").await.expect("begin");
            db::meta_set_u64(&mut tx, "a", 2).await.expect("write");
            db::meta_set_u64(&mut tx, "b", 2).await.expect("write");
            // Dropped without a commit.
        }
        assert_eq!(values(&mut conn).await, [Some(1), None]);

        // The connection is usable for the next transaction.
        let mut tx = Tx::begin(&mut conn, "begin").await.expect("begin");
        db::meta_set_u64(&mut tx, "b", 3).await.expect("write");
        tx.commit("commit").await.expect("commit");
        assert_eq!(values(&mut conn).await, [Some(1), Some(3)]);
    }

    #[tokio::test]
    async fn an_early_return_rolls_back() {
        async fn half_done(conn: &mut Conn, refuse: bool) -> Result<(), Error> {
            let mut tx = Tx::begin(conn, "begin").await?;
            db::meta_set_u64(&mut tx, "a", 7).await?;
            if refuse {
                return Err(Error::InvalidInput("refused".into()));
            }
            tx.commit("commit").await
        }
        let dir = tempfile::tempdir().expect("tmp");
        let mut conn = db::open(&dir.path().join("p.db")).await.expect("open");
        assert!(half_done(&mut conn, true).await.is_err());
        assert_eq!(values(&mut conn).await, [None, None]);
        half_done(&mut conn, false).await.expect("done");
        assert_eq!(values(&mut conn).await, [Some(7), None]);
    }

    #[tokio::test]
    async fn errors_name_the_work() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut conn = db::open(&dir.path().join("p.db")).await.expect("open");
        // A transaction inside a transaction is refused, with its name.
        sqlx::query("BEGIN")
            .execute(&mut conn)
            .await
            .expect("begin");
        match Tx::begin(&mut conn, "begin receiving").await {
            Err(Error::Database { what, .. }) => assert_eq!(what, "begin receiving"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("nested transaction was opened"),
        }
        sqlx::query("ROLLBACK")
            .execute(&mut conn)
            .await
            .expect("rollback");
    }
}
