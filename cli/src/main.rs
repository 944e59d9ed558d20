//! `meshwhisper`: the MeshWhisper node binary.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod backup;
mod bench;
mod bench_client;
mod bench_federation;
mod keys;
mod person;
mod relay;

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
    /// Copy a relay's database consistently, even while the relay runs.
    Backup(backup::BackupArgs),
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
