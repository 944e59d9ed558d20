//! `meshwhisper relay`: run a relay.

use anyhow::Context as _;
use meshwhisper_node::config::{Config, Overrides};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Data directory (database, media, archives, node key). Default ./meshwhisper-data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client gateway address (HTTP + WebSocket). Default 0.0.0.0:8080.
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<String>,
    /// libp2p listen address (repeatable). Default TCP and QUIC on port 4001.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
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
}

pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        http: args.http,
        listen: args.listen,
        log: args.log,
        federation: args.federation,
        bootstrap: args.bootstrap,
        blocklist_file: args.blocklist,
        external_addrs: args.external_addr,
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
        println!("meshwhisper relay {}", env!("CARGO_PKG_VERSION"));
        println!("peer_id={}", running.p2p.peer_id);
        if let Some(k) = meshwhisper_node::federation::key_of(&running.p2p.peer_id) {
            println!("relay_key={}", hex::encode(k));
        }
        println!("http=http://{}", running.http_addr);
        for a in addrs.borrow().iter() {
            println!("listen={a}/p2p/{}", running.p2p.peer_id);
        }
        println!("data_dir={}", cfg.data_dir.display());
        let cancel = running.cancel_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            cancel.cancel();
        });
        running.wait().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
