//! `meshwhisper backup` and `meshwhisper restore`: the whole relay (node
//! key, database, hot log, media, archives) in one file, taken while the
//! relay runs, and brought back into an empty directory.

use anyhow::Context as _;
use meshwhisper_node::p2p::KEY_FILE;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The relay's data directory.
    #[arg(long, default_value = "./meshwhisper-data")]
    data_dir: PathBuf,
    /// The database file, if not `<data-dir>/meshwhisper.db` (`DB_PATH`).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Where to write the backup (a tar file; must not exist). It holds
    /// the relay's secret key: it is created readable by you only.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file written by `meshwhisper backup`.
    #[arg(long)]
    from: PathBuf,
    /// The data directory to restore into; it must be absent or empty.
    #[arg(long, default_value = "./meshwhisper-data")]
    data_dir: PathBuf,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let db = args
        .db
        .unwrap_or_else(|| args.data_dir.join(meshwhisper_storage::DB_FILE));
    let report = runtime()?
        .block_on(meshwhisper_storage::backup::backup(
            &args.data_dir,
            &db,
            &[KEY_FILE],
            &args.out,
            std::time::Duration::from_secs(30),
        ))
        .with_context(|| {
            format!(
                "backing up {} to {}",
                args.data_dir.display(),
                args.out.display()
            )
        })?;
    println!(
        "backup written to {} ({} files, {} bytes: node key, database, media, archives)",
        args.out.display(),
        report.files,
        report.bytes
    );
    println!(
        "restore it with: meshwhisper restore --from {} --data-dir <empty directory>",
        args.out.display()
    );
    Ok(())
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let report = runtime()?
        .block_on(meshwhisper_storage::backup::restore(
            &args.from,
            &args.data_dir,
            &[KEY_FILE],
        ))
        .with_context(|| {
            format!(
                "restoring {} into {}",
                args.from.display(),
                args.data_dir.display()
            )
        })?;
    println!(
        "restored {} files ({} bytes) into {}",
        report.files,
        report.bytes,
        args.data_dir.display()
    );
    if args.data_dir.join(KEY_FILE).exists() {
        let key = meshwhisper_node::p2p::load_or_create_key(&args.data_dir)?;
        println!("peer_id={}", key.public().to_peer_id());
    } else {
        println!("the backup holds no node key: the relay will start with a new identity");
    }
    println!(
        "start it with: meshwhisper relay --data-dir {} (on the addresses it had, so clients find it)",
        args.data_dir.display()
    );
    Ok(())
}
