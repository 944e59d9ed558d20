//! A `testnet/` mesh of relay processes for tests: started with the
//! repository's scripts and the `meshwhisper` binary Cargo built, stopped
//! (with `down.sh`) when dropped, also when an assertion fails.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub struct Testnet {
    pub run: tempfile::TempDir,
    relay_args: String,
    /// The relay binary the scripts start (`MW_BIN`).
    pub bin: PathBuf,
}

impl Testnet {
    /// A testnet whose relays get `relay_args` (not started yet).
    pub fn new(relay_args: &[&str]) -> Self {
        Self {
            run: tempfile::tempdir().expect("tmp"),
            relay_args: relay_args.join(" "),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_meshwhisper")),
        }
    }

    /// Runs `testnet/<name>` with `args`.
    pub fn script(&self, name: &str, args: &[&str]) -> std::process::Output {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testnet")
            .join(name);
        Command::new("bash")
            .arg(script)
            .args(args)
            .env("MW_BIN", &self.bin)
            .env("MW_TESTNET_DIR", self.run.path())
            .env("MW_RELAY_ARGS", &self.relay_args)
            .output()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `up.sh n`, asserting it worked.
    pub fn up(&self, n: usize) {
        let out = self.script("up.sh", &[&n.to_string()]);
        assert!(
            out.status.success(),
            "testnet/up.sh {n} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The relay table: (pid, PeerId, HTTP base, libp2p address) per relay.
    pub fn relays(&self) -> Vec<(u32, String, String, String)> {
        let table =
            std::fs::read_to_string(self.run.path().join("relays.tsv")).expect("relay table");
        table
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (
                    f[1].parse().expect("pid"),
                    f[2].to_string(),
                    f[3].to_string(),
                    f[4].to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        let _ = self.script("down.sh", &[]);
    }
}
