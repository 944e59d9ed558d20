//! `meshwhisper keys ...`: derive identifiers from keys.
//!
//! Invalid arguments (bad hex, wrong lengths) are usage errors: clap prints
//! what is wrong and the process exits with code 2.

use clap::Subcommand;
use meshwhisper_crypto::destination::{DestHash, NamespaceId};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::primitives::X25519Public;
use std::io::Write as _;
use zeroize::Zeroizing;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the namespace id and destination hash of a recipient key.
    DestHash {
        /// The app's bundle id, e.g. com.example.chat (UTF-8).
        #[arg(long)]
        app_bundle_id: String,
        /// The developer's 32-byte public key, hex.
        #[arg(long, value_parser = hex32)]
        developer_key: Hex32,
        /// The recipient's 32-byte X25519 public key, hex.
        #[arg(long, value_parser = hex32)]
        recipient_key: Hex32,
        /// The epoch hour: unix milliseconds / 3,600,000.
        #[arg(long)]
        epoch_hour: u64,
    },
    /// Print the relay node's libp2p PeerId (creating its key if absent).
    PeerId {
        /// The relay's data directory.
        #[arg(long, default_value = "./meshwhisper-data")]
        data_dir: std::path::PathBuf,
    },
    /// Derive the X25519 key pair of an Ed25519 identity seed.
    X25519FromEd25519 {
        /// The 32-byte Ed25519 seed (private key), hex.
        #[arg(long, value_parser = hex32)]
        seed: Hex32,
    },
}

/// 32 bytes parsed from 64 hex digits.
#[derive(Clone)]
pub struct Hex32(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Hex32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hex32(..)")
    }
}

fn hex32(s: &str) -> Result<Hex32, String> {
    let s = s.trim();
    let bytes = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "expected 32 bytes (64 hex digits), got {} bytes",
            bytes.len()
        )
    })?;
    Ok(Hex32(Zeroizing::new(arr)))
}

pub fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    if let KeysCommand::PeerId { data_dir } = &cmd {
        return crate::relay::peer_id(data_dir);
    }
    let mut out = std::io::stdout().lock();
    match cmd {
        KeysCommand::PeerId { .. } => {}
        KeysCommand::DestHash {
            app_bundle_id,
            developer_key,
            recipient_key,
            epoch_hour,
        } => {
            let ns = NamespaceId::derive(&app_bundle_id, developer_key.0.as_ref());
            let hash = DestHash::derive(&ns, &X25519Public(*recipient_key.0), epoch_hour);
            writeln!(out, "namespace_id={}", hex::encode(ns.as_bytes()))?;
            writeln!(out, "dest_hash={hash}")?;
        }
        KeysCommand::X25519FromEd25519 { seed } => {
            let id = IdentityKeyPair::from_seed(&seed.0);
            writeln!(
                out,
                "ed25519_public_key={}",
                hex::encode(id.public().to_bytes())
            )?;
            writeln!(
                out,
                "x25519_public_key={}",
                hex::encode(id.public().x25519().as_bytes())
            )?;
            let secret = id.x25519().to_bytes();
            writeln!(out, "x25519_private_key={}", hex::encode(secret.as_ref()))?;
        }
    }
    Ok(())
}
