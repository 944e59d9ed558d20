//! `meshwhisper relay`: run a relay.

use anyhow::Context as _;
use meshwhisper_node::config::{Config, FederationMode, Overrides};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Data directory (database, media, archives, node key). Default ./meshwhisper-data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client gateway address (HTTP + WebSocket). Default 0.0.0.0:8080.
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<String>,
    /// libp2p listen address (repeatable). Default TCP and QUIC on port
    /// 4001. The relay exits if one cannot be bound.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// A libp2p listen address to use if it can be bound, skipped with a
    /// warning otherwise (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    listen_optional: Vec<String>,
    /// TOML configuration file (flags and environment override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log filter, e.g. `info` or `meshwhisper_node=debug` (RUST_LOG wins).
    #[arg(long)]
    log: Option<String>,
    /// Federation mode: open (default), allowlist or off.
    #[arg(long, value_name = "MODE")]
    federation: Option<meshwhisper_node::config::FederationMode>,
    /// A relay to join the mesh through: a multiaddr ending in
    /// /p2p/<PeerId> (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Blocklist file (one PeerId or hex key per line); re-read when it
    /// changes and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    blocklist: Option<PathBuf>,
    /// An address to advertise in our record besides the listen addresses
    /// (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    external_addr: Vec<String>,
    /// Whether this relay can be dialled from the internet: auto (probe;
    /// default), public (serve as an anchor) or private (behind NAT:
    /// anchor on public relays).
    #[arg(long, value_name = "auto|public|private")]
    reachability: Option<meshwhisper_node::config::Reachability>,
    /// Public relays a private relay keeps reservations on. Default 2.
    #[arg(long, value_name = "N")]
    anchors: Option<usize>,
    /// Dial only the bootstrap relays (uplinks) and send everything for
    /// other relays through them (an egress-filtered site).
    #[arg(long)]
    transit_only: bool,
    /// Send routed packets as onions through extra relays, so that no relay
    /// but the last learns which relay a packet is for.
    #[arg(long)]
    onion_transit: bool,
    /// Extra relays on an onion path (0-4). Default 1.
    #[arg(long, value_name = "N")]
    onion_hops: Option<u8>,
}

pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        http: args.http,
        listen: args.listen,
        listen_optional: args.listen_optional,
        log: args.log,
        federation: args.federation,
        bootstrap: args.bootstrap,
        blocklist_file: args.blocklist,
        external_addrs: args.external_addr,
        reachability: args.reachability,
        anchors: args.anchors,
        transit_only: args.transit_only,
        onion_transit: args.onion_transit,
        onion_hops: args.onion_hops,
    };
    let cfg = Config::load(
        args.config.as_deref(),
        |k| std::env::var(k).ok(),
        &overrides,
    )?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    init_logging(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let running = meshwhisper_node::start(cfg.clone())
            .await
            .context("starting the relay")?;
        let mut addrs = running.p2p.listen_addrs.clone();
        // Wait (bounded) until the listeners report their addresses.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            addrs.wait_for(|a| !a.is_empty()),
        )
        .await;
        let peer = running.p2p.peer_id;
        let listen: Vec<String> = addrs
            .borrow()
            .iter()
            .map(|a| format!("{a}/p2p/{peer}"))
            .collect();
        print!("{}", startup_text(&cfg, &peer, running.http_addr, &listen));
        let cancel = running.cancel_token();
        if cfg.federation.mode != FederationMode::Off && !cfg.federation.bootstrap.is_empty() {
            let mut fed = running.p2p.federation.clone();
            let c = cancel.clone();
            tokio::spawn(async move {
                let waited = tokio::select! {
                    _ = c.cancelled() => return,
                    r = tokio::time::timeout(NO_PEERS_WARNING, fed.wait_for(|s| !s.connected.is_empty())) => r,
                };
                if waited.is_err() {
                    tracing::warn!(
                        "no federation peers after {}s: check the --bootstrap addresses and that their port is reachable",
                        NO_PEERS_WARNING.as_secs()
                    );
                }
            });
        }
        let signalled = wait_for_signal();
        tokio::spawn(async move {
            signalled.await;
            tracing::info!("shutting down");
            cancel.cancel();
        });
        running.wait().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// A relay with bootstrap entries and no peer after this long says so.
const NO_PEERS_WARNING: std::time::Duration = std::time::Duration::from_secs(30);

/// A URL a person on this host can open for a bound address (0.0.0.0
/// and :: are not addresses one can connect to).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port())
}

/// What the relay prints once it listens: `key=value` lines for tools
/// (`peer_id=`, `relay_key=`, `http=`, `listen=`, `data_dir=`,
/// `federation=`), then notes and the next command for people.
fn startup_text(
    cfg: &Config,
    peer: &libp2p::PeerId,
    http: std::net::SocketAddr,
    listen: &[String],
) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(t, "meshwhisper relay {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(t, "peer_id={peer}");
    if let Some(k) = meshwhisper_node::federation::key_of(peer) {
        let _ = writeln!(t, "relay_key={}", hex::encode(k));
    }
    let _ = writeln!(t, "http=http://{}", reachable(http));
    for a in listen {
        let _ = writeln!(t, "listen={a}");
    }
    let _ = writeln!(t, "data_dir={}", cfg.data_dir.display());
    let f = &cfg.federation;
    let mode = f.mode.as_str();
    let _ = writeln!(t, "federation={mode}");
    if http.ip().is_unspecified() {
        let _ = writeln!(
            t,
            "note: clients on other machines use this host's address on port {}",
            http.port()
        );
    }
    if f.mode == FederationMode::Open {
        let _ = writeln!(
            t,
            "note: federation is open (our default; the reference relay's is off): relays that prove their key may join, up to {}; --federation off serves only this relay's clients",
            f.max_peers
        );
        if f.bootstrap.is_empty() {
            let _ = writeln!(
                t,
                "warning: federation is open with no peers and no --bootstrap: this relay meshes only with relays that dial it"
            );
        }
    }
    // The loopback TCP address, else the first: what a local client dials.
    let relay = listen
        .iter()
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
        .or_else(|| listen.first());
    if let Some(r) = relay {
        let _ = writeln!(t, "next: meshwhisper id new --relay {r} --name <your name>");
    }
    t
}

/// Resolves at SIGINT or SIGTERM. The handlers are installed when this
/// is called, not when the future is first polled, so a signal that comes
/// right after (a quick Ctrl-C) is caught rather than killing the process.
pub(crate) fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        async move {
            match streams {
                (Ok(mut i), Ok(mut t)) => {
                    tokio::select! {
                        _ = i.recv() => {}
                        _ = t.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub(crate) fn init_logging(default: &str) {
    // Kademlia warns at every start of a relay that knows no one yet ("no
    // known peers"): quiet unless asked for by name.
    let default = if default.contains("libp2p_kad") {
        default.to_string()
    } else {
        format!("{default},libp2p_kad::behaviour=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// `meshwhisper keys peer-id`: the node's PeerId, creating the key if absent.
pub fn peer_id(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let key = meshwhisper_node::p2p::load_or_create_key(data_dir)?;
    println!("{}", key.public().to_peer_id());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_text_is_usable_as_printed() {
        let cfg = Config::default();
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let listen = vec![
            format!("/ip4/10.1.2.3/tcp/4001/p2p/{peer}"),
            format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}"),
        ];
        let t = startup_text(&cfg, &peer, "0.0.0.0:8080".parse().expect("addr"), &listen);
        assert!(t.contains("http=http://127.0.0.1:8080\n"), "{t}");
        assert!(!t.contains("0.0.0.0"), "{t}");
        assert!(
            t.contains(&format!(
                "next: meshwhisper id new --relay /ip4/127.0.0.1/tcp/4001/p2p/{peer}"
            )),
            "{t}"
        );
        assert!(t.contains("federation=open\n"), "{t}");
        assert!(
            t.contains("warning: federation is open with no peers"),
            "{t}"
        );
        let mut off = Config::default();
        off.federation.mode = FederationMode::Off;
        let t = startup_text(
            &off,
            &peer,
            "127.0.0.1:9000".parse().expect("addr"),
            &listen,
        );
        assert!(
            t.contains("http=http://127.0.0.1:9000\n") && !t.contains("warning"),
            "{t}"
        );
    }
}
