//! `meshwhisper`: the MeshWhisper node binary.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod backup;
mod bench;
mod bench_abuse;
mod bench_client;
mod bench_federation;
mod bench_forwarder;
mod bench_holepunch;
mod bench_onion;
mod control;
mod keys;
mod person;
mod relay;

// The allocator returns freed memory to the system (docs/benchmarks.md,
// "Abuse resistance"); its settings are in .cargo/config.toml.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// MeshWhisper: end-to-end encrypted messaging through relays that cannot
/// read it.
#[derive(Debug, Parser)]
#[command(name = "meshwhisper", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Key and identifier tools.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Run a relay (defaults: data in ./meshwhisper-data, gateway on :8080,
    /// libp2p on TCP and QUIC port 4001).
    Relay(relay::RelayArgs),
    /// Back up a relay (node key, database, media, archives) into one
    /// file, even while it runs.
    Backup(backup::BackupArgs),
    /// Restore a relay from a backup into an empty data directory.
    Restore(backup::RestoreArgs),
    /// Load generators.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Your identity: create a profile or show it.
    #[command(subcommand)]
    Id(person::IdCommand),
    /// Print your invite (give it to people so they can add you).
    Invite(person::InviteArgs),
    /// Add, list and verify contacts.
    #[command(subcommand)]
    Contact(person::ContactCommand),
    /// Send one message and wait until a relay stored it.
    Send(person::SendArgs),
    /// Receive: print one line per event until interrupted.
    Listen(person::ListenArgs),
    /// Talk with a contact interactively.
    Chat(person::ChatArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keys(cmd) => keys::run(cmd),
        Command::Backup(args) => backup::run(args),
        Command::Restore(args) => backup::restore(args),
        Command::Relay(args) => relay::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Id(cmd) => person::id(cmd),
        Command::Invite(args) => person::invite(args),
        Command::Contact(cmd) => person::contact(cmd),
        Command::Send(args) => person::send(args),
        Command::Listen(args) => person::listen(args),
        Command::Chat(args) => person::chat(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors
/// already include their cause in their own message (as `io::Error`
/// wrappers and libp2p's do), so a cause whose text is already there is
/// not repeated.
pub(crate) fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn report_names_each_cause_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "Address already in use (os error 98)",
        );
        let inner = anyhow::Error::new(io)
            .context("binding 0.0.0.0:4001: Address already in use (os error 98)");
        let e = inner.context("starting the relay");
        assert_eq!(
            super::report(&e),
            "starting the relay: binding 0.0.0.0:4001: Address already in use (os error 98)"
        );
        let plain = anyhow::anyhow!("one").context("two");
        assert_eq!(super::report(&plain), "two: one");
    }
}
