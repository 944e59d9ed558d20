//! The gateway's accept loop.
//!
//! axum's own `serve` has no header timeout and no connection caps, so a
//! few thousand idle or slowloris connections from one host could use
//! every file descriptor. Here:
//!
//! - connections are capped per client address (IPv6 by /64) and in total,
//!   the total kept below the file-descriptor limit with headroom for the
//!   store, libp2p and the relay's own health checks (loopback gets a small
//!   reserve beyond the total);
//! - HTTP/1.1 with a header-read timeout that also bounds how long a
//!   keep-alive connection may sit idle between requests;
//! - request bodies time out when they stall and when they take too long
//!   in total (tower-http's body timeout layers);
//! - a connection whose writes make no progress for a while (a client that
//!   stopped reading) is closed, WebSockets included;
//! - WebSocket upgrades keep their connection's slot until they end;
//! - shutdown stops accepting and lets requests in progress finish.

use crate::gateway::ratelimit::client_key;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

/// The accept loop's bounds (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Headers must arrive within this; also the longest idle keep-alive.
    pub header_read: Duration,
    /// The longest pause between two pieces of a request body.
    pub body_idle: Duration,
    /// The longest a whole request body may take.
    pub body_total: Duration,
    /// The longest a write may make no progress (the client stopped reading).
    pub write_stall: Duration,
    /// Connections from one client address (0: no cap, e.g. behind a proxy).
    pub per_ip: usize,
    /// Connections in total.
    pub total: usize,
    /// Extra connections from loopback beyond `total` (health checks).
    pub loopback_reserve: usize,
    /// How long shutdown waits for requests in progress.
    pub drain: Duration,
}

/// Connections refused, for metrics.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Refused: the client address had its share.
    pub refused_per_ip: AtomicU64,
    /// Refused: the relay had no room (file descriptors).
    pub refused_total: AtomicU64,
    /// Closed: headers or body too slow, or writes stalled.
    pub timed_out: AtomicU64,
    /// Accept failed (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Counts open connections per client address and in total.
#[derive(Debug)]
pub struct ConnLimiter {
    limits: HttpLimits,
    counts: Mutex<Counts>,
    /// Refusals and timeouts.
    pub stats: ConnStats,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl ConnLimiter {
    /// A limiter for `limits`.
    pub fn new(limits: HttpLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            stats: ConnStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        match self.counts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Counts a connection from `ip`, or refuses it.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let key = client_key(ip.to_canonical());
        let l = &self.limits;
        let mut c = self.lock();
        let cap = if key.is_loopback() {
            l.total.saturating_add(l.loopback_reserve)
        } else {
            l.total
        };
        if c.total >= cap {
            self.stats.refused_total.fetch_add(1, Relaxed);
            return None;
        }
        let n = c.by_ip.entry(key).or_insert(0);
        if l.per_ip > 0 && *n >= l.per_ip {
            self.stats.refused_per_ip.fetch_add(1, Relaxed);
            return None;
        }
        *n += 1;
        c.total += 1;
        Some(ConnPermit {
            limiter: self.clone(),
            key,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.limiter.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_ip.remove(&self.key);
            }
        }
    }
}

/// A TCP stream that carries its permit (released when the socket goes,
/// which for a WebSocket is when the upgraded stream ends) and closes
/// itself when a write makes no progress for `write_stall`.
struct Conn {
    tcp: TcpStream,
    _permit: ConnPermit,
    stall: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    limiter: Arc<ConnLimiter>,
}

impl Conn {
    /// Arms (or checks) the stall timer after a write returned Pending.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let stall = self.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.limiter.stats.timed_out.fetch_add(1, Relaxed);
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match f(Pin::new(&mut self.tcp), cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx).map(Err),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |t, cx| t.poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |t, cx| t.poll_write_vectored(cx, b))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |t, cx| t.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Raises the soft file-descriptor limit to the hard one and returns the
/// soft limit now in force (`None`: unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let lim = getrlimit(Resource::Nofile);
        if lim.current != lim.maximum {
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: lim.maximum,
                    maximum: lim.maximum,
                },
            );
        }
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Serves `app` on `listener` until `cancel`, then waits (bounded) for
/// requests in progress.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limiter: Arc<ConnLimiter>,
    cancel: CancellationToken,
) {
    let lim = limiter.limits;
    let app = app
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            lim.body_idle,
        ))
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(
            lim.body_total,
        ));
    let mut make = app.into_make_service_with_connect_info::<SocketAddr>();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(lim.header_read)
        .keep_alive(true);
    let tracker = tokio_util::task::TaskTracker::new();
    let mut last_accept_warning: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors (or similar): back off
                    // rather than spin, and say so at most every 10 s.
                    limiter.stats.accept_errors.fetch_add(1, Relaxed);
                    if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "accepting a client connection failed");
                        last_accept_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Refused before anything is read: dropping the stream closes it.
        let Some(permit) = limiter.try_acquire(peer.ip()) else {
            continue;
        };
        // Packets are small and latency-sensitive: never let Nagle's
        // algorithm hold one back waiting for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let svc = match make.call(peer).await {
            Ok(svc) => svc,
            Err(e) => match e {},
        };
        let io = TokioIo::new(Conn {
            tcp,
            _permit: permit,
            stall: lim.write_stall,
            stalled: None,
            limiter: limiter.clone(),
        });
        let conn = http
            .serve_connection(io, TowerToHyperService::new(svc))
            .with_upgrades();
        let cancel = cancel.clone();
        let limiter = limiter.clone();
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(lim.drain, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = res {
                if e.is_timeout() {
                    limiter.stats.timed_out.fetch_add(1, Relaxed);
                }
                tracing::debug!(%peer, timeout = e.is_timeout(), error = %e, "client connection ended");
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize, total: usize) -> HttpLimits {
        HttpLimits {
            header_read: Duration::from_secs(1),
            body_idle: Duration::from_secs(1),
            body_total: Duration::from_secs(1),
            write_stall: Duration::from_secs(1),
            per_ip,
            total,
            loopback_reserve: 1,
            drain: Duration::from_secs(1),
        }
    }

    #[test]
    fn caps_per_address_and_in_total_with_a_loopback_reserve() {
        let l = ConnLimiter::new(limits(2, 3));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p1 = l.try_acquire(a).expect("1");
        let _p2 = l.try_acquire(a).expect("2");
        assert!(l.try_acquire(a).is_none(), "per address");
        let _p3 = l.try_acquire(b).expect("3");
        assert!(
            l.try_acquire("10.0.0.3".parse().expect("ip")).is_none(),
            "total"
        );
        let lo = l
            .try_acquire("127.0.0.1".parse().expect("ip"))
            .expect("reserve");
        drop(lo);
        drop(p1);
        assert!(l.try_acquire(a).is_some(), "a slot freed");
        // IPv6 addresses of one /64 share a count; the mapped form of an
        // IPv4 address is that address.
        let l = ConnLimiter::new(limits(1, 100));
        let _x = l
            .try_acquire("2001:db8::1".parse().expect("ip"))
            .expect("x");
        assert!(l.try_acquire("2001:db8::2".parse().expect("ip")).is_none());
        let _y = l.try_acquire("10.9.9.9".parse().expect("ip")).expect("y");
        assert!(
            l.try_acquire("::ffff:10.9.9.9".parse().expect("ip"))
                .is_none()
        );
        assert_eq!(l.stats.refused_per_ip.load(Relaxed), 2);
    }
}
