//! The channel sessions and the store hand packets to the federation on.
//!
//! Packets go over it in batches (a client's batch is one message, one
//! wake-up of the federation's task), and it is bounded in packets, not
//! in batches: a semaphore holds one permit per packet of room, taken by
//! the sender and given back once the federation has taken the batch.
//! (The channel under it has room for as many batches as packets, so it
//! is never what refuses a batch.)

use crate::core::Federate;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// The sending side (cloned by everyone who hands packets over).
#[derive(Debug, Clone)]
pub struct HandoffTx {
    tx: mpsc::Sender<Vec<Federate>>,
    room: Arc<Semaphore>,
}

/// The federation's side.
#[derive(Debug)]
pub struct HandoffRx {
    rx: mpsc::Receiver<Vec<Federate>>,
    room: Arc<Semaphore>,
}

/// A hand-off channel with room for `max` packets.
pub fn handoff(max: usize) -> (HandoffTx, HandoffRx) {
    let max = max.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(max);
    let room = Arc::new(Semaphore::new(max));
    (
        HandoffTx {
            tx,
            room: room.clone(),
        },
        HandoffRx { rx, room },
    )
}

/// The packets were not handed over (no room, or the federation stopped).
#[derive(Debug)]
pub struct NotHanded(pub Vec<Federate>);

impl HandoffTx {
    /// Hands `batch` over whole if there is room for all of it now.
    pub fn try_send(&self, batch: Vec<Federate>) -> Result<(), NotHanded> {
        let Ok(n) = u32::try_from(batch.len()) else {
            return Err(NotHanded(batch));
        };
        match self.room.try_acquire_many(n) {
            Ok(permits) => {
                permits.forget();
                self.tx.try_send(batch).map_err(|e| {
                    self.room.add_permits(n as usize);
                    NotHanded(e.into_inner())
                })
            }
            Err(_) => Err(NotHanded(batch)),
        }
    }

    /// Hands `batch` over, waiting for room.
    pub async fn send(&self, batch: Vec<Federate>) -> Result<(), NotHanded> {
        let Ok(n) = u32::try_from(batch.len()) else {
            return Err(NotHanded(batch));
        };
        match self.room.acquire_many(n).await {
            Ok(permits) => {
                permits.forget();
                self.tx.send(batch).await.map_err(|e| {
                    self.room.add_permits(n as usize);
                    NotHanded(e.0)
                })
            }
            Err(_) => Err(NotHanded(batch)),
        }
    }
}

impl HandoffRx {
    /// Waits for packets and takes up to `limit` batches of them into
    /// `out`; 0 once every sender is gone.
    pub async fn recv_many(&mut self, out: &mut Vec<Federate>, limit: usize) -> usize {
        let mut batches = Vec::new();
        if self.rx.recv_many(&mut batches, limit).await == 0 {
            return 0;
        }
        let before = out.len();
        for b in batches {
            out.extend(b);
        }
        let n = out.len() - before;
        self.room.add_permits(n);
        // A batch is never empty, so a wake-up always brings packets.
        n.max(1)
    }

    /// Stops taking packets (senders fail from now on) and returns what
    /// was handed over and not taken yet.
    pub fn close(&mut self) -> Vec<Federate> {
        self.room.close();
        self.rx.close();
        let mut left = Vec::new();
        while let Ok(b) = self.rx.try_recv() {
            left.extend(b);
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use meshwhisper_crypto::destination::DestHash;

    fn packets(n: usize) -> Vec<Federate> {
        (0..n)
            .map(|i| Federate {
                mailbox_id: None,
                dest: DestHash([i as u8; 8]),
                packet: Bytes::from_static(b"p"),
                hint: None,
                deadline_ms: 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn bounded_in_packets_not_batches() {
        let (tx, mut rx) = handoff(5);
        tx.try_send(packets(3)).expect("room for 3");
        let NotHanded(back) = tx.try_send(packets(3)).expect_err("3 more do not fit");
        assert_eq!(back.len(), 3, "given back whole");
        tx.try_send(packets(2)).expect("2 do");
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 16).await, 5);
        assert_eq!(out.len(), 5);
        // Taking them made room again.
        tx.try_send(packets(5)).expect("room again");
    }

    #[tokio::test]
    async fn closing_returns_what_was_not_taken_and_refuses_more() {
        let (tx, mut rx) = handoff(10);
        tx.try_send(packets(4)).expect("room");
        assert_eq!(rx.close().len(), 4);
        assert!(tx.try_send(packets(1)).is_err());
        assert!(tx.send(packets(1)).await.is_err());
    }
}
