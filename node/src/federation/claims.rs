//! Directory claims made at other relays for our devices: a device asks
//! its own relay for a contact's bundle and one-time prekey, and this
//! relay asks the contact's home relay over federation, so the device
//! never talks to (or reveals its address to) anyone but its own relay.
//! Bounded in number; each expires after [`CLAIM_TIMEOUT_MS`] (the device
//! retries).

use super::action::Action;
use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::device::codec::Status;
use meshwhisper_behaviour::federation::codec::Frame;
use std::collections::HashMap;

/// How long a claim may wait for its answer.
pub const CLAIM_TIMEOUT_MS: u64 = 15_000;

/// How a claim goes to the home relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Way {
    /// Its stream is open.
    Open,
    /// Along this path (first relay first, the home relay last): we
    /// cannot dial the home relay.
    Through(Vec<PeerId>),
    /// Reach it first (dial).
    Reach,
}

#[derive(Debug)]
struct Pending {
    target: PeerId,
    /// The relay the claim went through (a transit-only relay's uplink).
    via: Option<PeerId>,
    frame: Frame,
    deadline_ms: u64,
    sent: bool,
}

/// Claims in flight.
#[derive(Debug)]
pub struct Claims {
    max: usize,
    next_req: u64,
    pending: HashMap<u64, Pending>,
    finished: Vec<(u64, Option<(Status, Bytes)>)>,
}

impl Claims {
    /// At most `max` claims in flight.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            next_req: 0,
            pending: HashMap::new(),
            finished: Vec::new(),
        }
    }

    /// Asks `target` for `identity`'s bundle; the request id, or `None`
    /// when too many are in flight. `open`: whether its stream is open
    /// (else the caller reaches it and the claim goes when it opens).
    pub fn request(
        &mut self,
        now: u64,
        target: PeerId,
        namespace: String,
        identity: [u8; 32],
        way: Way,
        out: &mut Vec<Action>,
    ) -> Option<u64> {
        if self.pending.len() >= self.max {
            return None;
        }
        self.next_req += 1;
        let req = self.next_req;
        let frame = Frame::Claim {
            req,
            namespace,
            identity,
        };
        let through = match &way {
            Way::Through(path) => super::transit::wrap_path(path, frame.clone()),
            _ => None,
        };
        let (open, via) = match (way, through) {
            (Way::Open, _) => {
                out.push(Action::Send {
                    peer: target,
                    frame: frame.clone(),
                });
                (true, None)
            }
            (_, Some((v, f))) => {
                out.push(Action::Send { peer: v, frame: f });
                (false, Some(v))
            }
            _ => {
                out.push(Action::Reach(target));
                (false, None)
            }
        };
        self.pending.insert(
            req,
            Pending {
                target,
                via,
                frame,
                deadline_ms: now + CLAIM_TIMEOUT_MS,
                sent: open || via.is_some(),
            },
        );
        Some(req)
    }

    /// A stream to `peer` opened: claims waiting for it go.
    pub fn stream_opened(&mut self, peer: PeerId, out: &mut Vec<Action>) {
        for p in self.pending.values_mut() {
            if p.target == peer && !p.sent {
                p.sent = true;
                out.push(Action::Send {
                    peer,
                    frame: p.frame.clone(),
                });
            }
        }
    }

    /// `peer` answered claim `req`.
    pub fn reply(&mut self, peer: PeerId, req: u64, status: Status, body: Bytes) {
        if self
            .pending
            .get(&req)
            .is_some_and(|p| p.target == peer || p.via == Some(peer))
        {
            self.pending.remove(&req);
            self.finished.push((req, Some((status, body))));
        }
    }

    /// Claims past their time fail.
    pub fn tick(&mut self, now: u64) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now)
            .map(|(r, _)| *r)
            .collect();
        for r in expired {
            self.pending.remove(&r);
            self.finished.push((r, None));
        }
    }

    /// Claims answered or failed since the last call.
    pub fn take_finished(&mut self) -> Vec<(u64, Option<(Status, Bytes)>)> {
        std::mem::take(&mut self.finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_wait_for_the_stream_answer_once_and_expire() {
        let mut c = Claims::new(2);
        let t = PeerId::random();
        let mut out = Vec::new();
        let r1 = c
            .request(0, t, "ns".into(), [1; 32], Way::Reach, &mut out)
            .expect("room");
        assert!(matches!(out[0], Action::Reach(p) if p == t));
        out.clear();
        c.stream_opened(t, &mut out);
        assert!(
            matches!(&out[0], Action::Send { frame: Frame::Claim { req, .. }, .. } if *req == r1)
        );
        let r2 = c
            .request(0, t, "ns".into(), [2; 32], Way::Open, &mut out)
            .expect("room");
        assert!(
            c.request(0, t, "ns".into(), [3; 32], Way::Open, &mut out)
                .is_none(),
            "bounded"
        );
        // A reply from someone else is ignored.
        c.reply(PeerId::random(), r1, Status::Ok, Bytes::new());
        c.reply(t, r1, Status::NotFound, Bytes::new());
        c.tick(CLAIM_TIMEOUT_MS);
        let done = c.take_finished();
        assert_eq!(done.len(), 2);
        assert!(done.contains(&(r1, Some((Status::NotFound, Bytes::new())))));
        assert!(done.contains(&(r2, None)));
    }
}
