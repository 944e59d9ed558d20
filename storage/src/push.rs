//! Push wake registrations by destination hash. They outlive the
//! connection that made them, so an offline device can be woken.

use crate::error::{Error, Result};
use crate::{Store, ms};
use meshwhisper_crypto::destination::DestHash;
use sqlx::Row as _;

/// Longest token, topic or subscription accepted.
pub const MAX_FIELD_LEN: usize = 8 * 1024;

/// Where and how to wake a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// `apns`, `fcm` or `webpush`.
    pub platform: String,
    /// The device token (for webpush, the subscription JSON).
    pub token: String,
    /// APNs topic, if any.
    pub topic: Option<String>,
    /// Web Push subscription JSON, if any.
    pub subscription: Option<String>,
}

fn check(what: &'static str, s: &str) -> Result<()> {
    if s.len() > MAX_FIELD_LEN {
        return Err(Error::TooLarge {
            what,
            got: s.len() as u64,
            max: MAX_FIELD_LEN as u64,
        });
    }
    Ok(())
}

/// The push registration API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Push<'a> {
    pub(crate) store: &'a Store,
}

impl Push<'_> {
    /// Records (or replaces) the registrations for `dests`.
    pub async fn register(
        &self,
        dests: Vec<DestHash>,
        reg: Registration,
        now_ms: u64,
    ) -> Result<()> {
        if !matches!(reg.platform.as_str(), "apns" | "fcm" | "webpush") {
            return Err(Error::Invalid {
                what: "push platform",
                why: "must be apns, fcm or webpush",
            });
        }
        check("push token", &reg.token)?;
        check("push topic", reg.topic.as_deref().unwrap_or(""))?;
        check(
            "push subscription",
            reg.subscription.as_deref().unwrap_or(""),
        )?;
        if dests.len() > 4096 {
            return Err(Error::TooLarge {
                what: "destination hashes per registration",
                got: dests.len() as u64,
                max: 4096,
            });
        }
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    for d in dests {
                        sqlx::query(
                            "INSERT INTO push (dest, platform, token, topic, subscription, updated_ms) \
                             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dest) DO UPDATE SET \
                             platform = excluded.platform, token = excluded.token, topic = excluded.topic, \
                             subscription = excluded.subscription, updated_ms = excluded.updated_ms",
                        )
                        .bind(d.0.as_slice())
                        .bind(&reg.platform)
                        .bind(&reg.token)
                        .bind(&reg.topic)
                        .bind(&reg.subscription)
                        .bind(ms(now_ms))
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("register push", e))?;
                    }
                    Ok(())
                })
            }))
            .await
    }

    /// The registration for `dest`.
    pub async fn get(&self, dest: DestHash) -> Result<Option<Registration>> {
        let row =
            sqlx::query("SELECT platform, token, topic, subscription FROM push WHERE dest = ?")
                .bind(dest.0.as_slice())
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read push", e))?;
        row.map(|r| {
            Ok(Registration {
                platform: r.try_get("platform")?,
                token: r.try_get("token")?,
                topic: r.try_get("topic")?,
                subscription: r.try_get("subscription")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| self.store.db_err("read push", e))
    }

    /// Forgets the registration for `dest`; returns whether there was one.
    pub async fn remove(&self, dest: DestHash) -> Result<bool> {
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let r = sqlx::query("DELETE FROM push WHERE dest = ?")
                        .bind(dest.0.as_slice())
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("remove push", e))?;
                    Ok(r.rows_affected() > 0)
                })
            }))
            .await
    }

    /// Registrations stored.
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM push").await
    }
}
