//! `meshwhisper backup`: a consistent copy of a relay's database, safe to
//! take while the relay runs.

use anyhow::Context as _;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The relay's data directory.
    #[arg(long, default_value = "./meshwhisper-data")]
    data_dir: PathBuf,
    /// The database file, if not `<data-dir>/meshwhisper.db`.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Where to write the copy (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let db = args
        .db
        .unwrap_or_else(|| args.data_dir.join(meshwhisper_storage::DB_FILE));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(meshwhisper_storage::backup_database(
        &db,
        &args.out,
        std::time::Duration::from_secs(30),
    ))
    .with_context(|| format!("backing up {} to {}", db.display(), args.out.display()))?;
    println!("backup written to {}", args.out.display());
    println!(
        "media and archive files are not in it: copy {} and {} too",
        args.data_dir.join("media").display(),
        args.data_dir.join("archive").display()
    );
    Ok(())
}
