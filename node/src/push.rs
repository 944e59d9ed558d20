//! Content-free push wake: a POST to the operator's webhook saying which
//! destination hash has mail, so a push gateway can wake the device. Wakes
//! go through a bounded queue to one worker, which looks the destination's
//! registration up and calls the webhook; when the queue is full the wake
//! is dropped and counted (the packet itself stays queued). No task is
//! started per packet.

use crate::events::EventCounts;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::push::Registration;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Per-call timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook body, keys in the reference's order:
/// `{"token","platform","topic"?,"pushSubscription"?,"destHash"}`.
pub fn body(reg: &Registration, dest: DestHash) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "{{\"token\":{},\"platform\":{}",
        q(&reg.token),
        q(&reg.platform)
    );
    if let Some(t) = &reg.topic {
        out.push_str(&format!(",\"topic\":{}", q(t)));
    }
    if let Some(s) = &reg.subscription {
        let v = serde_json::from_str::<serde_json::Value>(s)
            .unwrap_or_else(|_| serde_json::Value::String(s.clone()));
        out.push_str(&format!(",\"pushSubscription\":{v}"));
    }
    out.push_str(&format!(",\"destHash\":{}}}", q(&dest.to_hex())));
    out
}

/// Sends wakes to the webhook.
#[derive(Debug, Clone)]
pub struct PushSender {
    tx: Option<mpsc::Sender<DestHash>>,
}

impl PushSender {
    /// A sender that does nothing (no webhook configured).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the worker for `url` (http://), reading registrations from
    /// `store`; each wake it sends counts in `events`.
    pub fn start(
        url: String,
        queue: usize,
        store: meshwhisper_storage::Store,
        metrics: Arc<Metrics>,
        events: Arc<EventCounts>,
        cancel: CancellationToken,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<DestHash>(queue.max(1));
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        tokio::spawn(async move {
            loop {
                let dest = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    d = rx.recv() => match d { Some(d) => d, None => break },
                };
                let reg = match store.push().get(dest).await {
                    Ok(Some(reg)) => reg,
                    // Not registered for push: nothing to wake.
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading push registration");
                        continue;
                    }
                };
                events.wake.fetch_add(1, Relaxed);
                let body = body(&reg, dest);
                let req = hyper::Request::post(&url)
                    .header("content-type", "application/json")
                    .header("content-length", body.len())
                    .body(Full::new(Bytes::from(body)));
                let Ok(req) = req else {
                    metrics.push_failed.fetch_add(1, Relaxed);
                    continue;
                };
                match tokio::time::timeout(TIMEOUT, client.request(req)).await {
                    Ok(Ok(resp)) if resp.status().is_success() => {
                        metrics.push_sent.fetch_add(1, Relaxed);
                    }
                    Ok(Ok(resp)) => {
                        tracing::debug!(status = %resp.status(), "push webhook refused a wake");
                        metrics.push_failed.fetch_add(1, Relaxed);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "push webhook unreachable");
                        metrics.push_failed.fetch_add(1, Relaxed);
                    }
                    Err(_) => {
                        tracing::debug!("push webhook timed out");
                        metrics.push_failed.fetch_add(1, Relaxed);
                    }
                }
            }
        });
        Self { tx: Some(tx) }
    }

    /// Whether a webhook is configured.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a wake for `dest` (sent if it registered for push);
    /// returns `false` if the queue was full and it was dropped.
    pub fn wake(&self, dest: DestHash) -> bool {
        match &self.tx {
            Some(tx) => tx.try_send(dest).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_keeps_the_reference_key_order() {
        let reg = Registration {
            platform: "webpush".into(),
            token: "{\"endpoint\":\"x\"}".into(),
            topic: Some("t\"q".into()),
            subscription: Some("{\"endpoint\":\"x\"}".into()),
        };
        let b = body(&reg, DestHash([0xab; 8]));
        assert_eq!(
            b,
            "{\"token\":\"{\\\"endpoint\\\":\\\"x\\\"}\",\"platform\":\"webpush\",\"topic\":\"t\\\"q\",\"pushSubscription\":{\"endpoint\":\"x\"},\"destHash\":\"abababababababab\"}"
        );
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid json");
        assert_eq!(v["destHash"], "abababababababab");
    }
}
