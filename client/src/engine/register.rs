//! Registration: telling our home relay which destination hashes we
//! receive on.

use super::Engine;
use crate::net::Command;
use crate::{Error, db};
use meshwhisper_behaviour::device::codec::Frame;
use meshwhisper_crypto::destination;

/// At most this many hours ahead (the relay takes at most 4096 hashes
/// from one client).
const MAX_HOME_HOURS: u64 = 4000;
/// Future hashes are named again after this many hours connected.
const HOME_AGAIN_HOURS: u64 = 24;

impl Engine {
    /// Names our destination hashes for the next `home_hours` hours to our
    /// relay (the device `Home` frame), so it keeps packets for them while
    /// we are offline, at each connection and daily while connected. One-
    /// shot senders do it too: a contact's reply must find a home.
    pub(super) fn announce_home(&mut self) {
        let hour = destination::epoch_hour(self.now());
        if self
            .homed_hour
            .is_some_and(|h| hour < h.saturating_add(HOME_AGAIN_HOURS))
        {
            return;
        }
        self.homed_hour = Some(hour);
        let ahead = self.cfg.home_hours.min(MAX_HOME_HOURS);
        let hashes: Vec<[u8; 8]> = destination::window(
            &self.p.namespace,
            &self.p.identity.public().x25519(),
            self.now(),
            0,
            ahead,
        )
        .into_iter()
        .map(|(_, h)| h.0)
        .collect();
        self.net_cmd(Command::Frame {
            peer: self.p.relay,
            frame: Frame::Home(hashes),
        });
    }

    /// Registers the hashes we receive on: the current and previous hour,
    /// and after time offline, every hour since (up to `catch_up_hours`),
    /// so the relay drains what was sent meanwhile.
    pub(super) async fn register(&mut self) -> Result<(), Error> {
        if !self.cfg.receive {
            return Ok(());
        }
        let now = self.now();
        let hour = destination::epoch_hour(now);
        let back = match (
            self.registered_hour,
            db::meta_u64(self.conn(), "online_hour").await?,
        ) {
            (Some(_), _) => 1,
            (None, Some(last)) if last < hour => {
                (hour - last + 1).min(self.cfg.catch_up_hours.max(1))
            }
            _ => 1,
        };
        if self.registered_hour.is_some_and(|h| h != hour) {
            // We stayed connected across the hour: everything older is drained.
            db::meta_set_u64(self.conn(), "online_hour", hour).await?;
        } else if self.registered_hour.is_none()
            && db::meta_u64(self.conn(), "online_hour").await?.is_none()
        {
            db::meta_set_u64(self.conn(), "online_hour", hour).await?;
        }
        let hashes: Vec<[u8; 8]> = destination::window(
            &self.p.namespace,
            &self.p.identity.public().x25519(),
            now,
            back,
            0,
        )
        .into_iter()
        .map(|(_, h)| h.0)
        .collect();
        self.registered_hour = Some(hour);
        self.net_cmd(Command::Frame {
            peer: self.p.relay,
            frame: Frame::Register(hashes),
        });
        Ok(())
    }
}
