//! Storage errors: typed, with context (which file, which limit).

use std::path::PathBuf;

/// A storage operation failed. Nothing was changed unless the operation
/// says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The disk (or the configured database size limit) is full.
    #[error("no space left writing {path}")]
    DiskFull {
        /// The database or file that could not grow.
        path: PathBuf,
    },
    /// A database statement failed.
    #[error("database error during {context} ({path}): {source}")]
    Database {
        /// The operation.
        context: &'static str,
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
    /// Migrating the schema failed.
    #[error("migrating {path}: {source}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The database was written by a newer MeshWhisper.
    #[error(
        "{path} has schema version {found}, newer than this binary supports ({supported}); upgrade meshwhisper or restore a backup"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this binary knows.
        supported: i64,
    },
    /// The file is an SQLite database of some other application.
    #[error("{path} is not a MeshWhisper database ({why})")]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// What gave it away.
        why: String,
    },
    /// The file is not a database, or it is damaged.
    #[error("{path} is corrupt or not a database: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// SQLite's message.
        detail: String,
    },
    /// A value exceeded a configured limit.
    #[error("{what} is {got} bytes/items, over the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        got: u64,
        /// The limit (a config field).
        max: u64,
    },
    /// An argument was malformed.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The argument.
        what: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A bearer token did not match the pinned one.
    #[error("{what}: token does not match")]
    Unauthorized {
        /// Which token.
        what: &'static str,
    },
    /// The username belongs to another identity.
    #[error("username already claimed by a different identity in this namespace")]
    UsernameTaken,
    /// A username transfer authorisation did not verify.
    #[error("username transfer rejected: {0}")]
    TransferRejected(&'static str),
    /// A namespace already has another policy.
    #[error("namespace policy already set to {current}")]
    PolicyConflict {
        /// The policy in force.
        current: crate::directory::UsernamePolicy,
    },
    /// The address book is full of newer records.
    #[error("address book is full ({max} records)")]
    BookFull {
        /// The configured cap.
        max: u64,
    },
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
    /// Another process has the data directory open.
    #[error("data directory: {0}")]
    Locked(#[from] crate::lock::LockError),
    /// A path that must be a directory is something else.
    #[error("{0} is a file, not a directory")]
    NotADirectory(PathBuf),
}

impl Error {
    /// A short stable label, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::DiskFull { .. } => "disk_full",
            Error::Database { .. } => "database",
            Error::Migrate { .. } => "migrate",
            Error::NewerSchema { .. } => "newer_schema",
            Error::Foreign { .. } => "foreign",
            Error::Corrupt { .. } => "corrupt",
            Error::TooLarge { .. } => "too_large",
            Error::Invalid { .. } => "invalid",
            Error::Unauthorized { .. } => "unauthorized",
            Error::UsernameTaken => "username_taken",
            Error::TransferRejected(_) => "transfer_rejected",
            Error::PolicyConflict { .. } => "policy_conflict",
            Error::BookFull { .. } => "book_full",
            Error::Closed => "closed",
            Error::Locked(_) => "locked",
            Error::NotADirectory(_) => "not_a_directory",
        }
    }

    /// Classifies an sqlx error: full disk and corruption get their own
    /// variants, everything else is a database error with context.
    pub(crate) fn db(context: &'static str, path: &std::path::Path, source: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &source {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            match code & 0xff {
                13 => {
                    return Error::DiskFull {
                        path: path.to_path_buf(),
                    };
                }
                11 | 26 => {
                    return Error::Corrupt {
                        path: path.to_path_buf(),
                        detail: db.message().to_string(),
                    };
                }
                _ => {}
            }
        }
        Error::Database {
            context,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::StorageFull
            || source.kind() == std::io::ErrorKind::QuotaExceeded
        {
            return Error::DiskFull {
                path: path.to_path_buf(),
            };
        }
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Storage results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
