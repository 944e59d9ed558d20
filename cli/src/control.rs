//! Commands handed to the process that has a profile open.
//!
//! One process at a time uses a profile (it owns the ratchets and the
//! outbox). While `listen` or `chat` runs, it also listens on a Unix
//! socket in the profile directory (`control.sock`, 0600 in the 0700
//! directory), so that `send`, `contact add` and `contact verify --confirm`
//! in another terminal are carried out by that process instead of being
//! refused. Read-only commands open the profile read-only and need no
//! socket.
//!
//! The protocol is one JSON object per line: one request, one response,
//! then the connection closes. Requests are bounded in size
//! ([`MAX_REQUEST`]), connections in number ([`MAX_CONNECTIONS`]) and time
//! ([`IO_TIMEOUT`] to read a request).

use anyhow::{Context as _, bail};
use meshwhisper_client::{Client, Invite};
use meshwhisper_crypto::safety_number;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_util::sync::CancellationToken;

/// The socket's name in the profile directory.
pub const SOCKET: &str = "control.sock";
/// Largest request line (a message body is at most 64 KiB).
const MAX_REQUEST: u64 = 256 * 1024;
/// Connections served at once; more wait for a free slot.
const MAX_CONNECTIONS: usize = 4;
/// How long a peer may take to send its request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait a `send` request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Serves the socket until `cancel`; a socket left by a killed process is
/// replaced (we hold the profile lock, so no one else serves it).
pub fn serve(dir: &Path, client: Client, cancel: CancellationToken) {
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "other meshwhisper commands cannot reach this process (no control socket)");
            return;
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = cancel.cancelled() => break,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "control accept");
                        continue;
                    }
                },
            };
            let client = client.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = handle(stream, client).await {
                    tracing::debug!(error = %e, "control request");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
}

async fn handle(stream: tokio::net::UnixStream, client: Client) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = tokio::time::timeout(
        IO_TIMEOUT,
        BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .context("request timed out")??;
    let response = if n == 0 || !line.ends_with('\n') {
        json!({"ok": false, "error": "request missing or too large"})
    } else {
        match serde_json::from_str::<Value>(&line) {
            Ok(req) => match carry_out(&req, &client).await {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": crate::report(&e)}),
            },
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        }
    };
    w.write_all(format!("{response}\n").as_bytes()).await?;
    w.shutdown().await?;
    Ok(())
}

fn field<'a>(req: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    req[name]
        .as_str()
        .with_context(|| format!("request has no {name:?}"))
}

async fn carry_out(req: &Value, client: &Client) -> anyhow::Result<Value> {
    match field(req, "op")? {
        "send" => {
            let contact = field(req, "contact")?;
            let text = field(req, "text")?;
            let wait = Duration::from_millis(req["waitMs"].as_u64().unwrap_or(0)).min(MAX_WAIT);
            let id = client.send(contact, text.as_bytes().to_vec()).await?;
            let stored = tokio::time::timeout(wait, client.flush())
                .await
                .is_ok_and(|r| r.is_ok());
            Ok(json!({"ok": true, "id": hex::encode(id), "stored": stored}))
        }
        "add-contact" => {
            let invite = Invite::from_text(field(req, "invite")?)?;
            let name = req["name"].as_str().map(str::to_string);
            let existing = client
                .contacts()
                .await?
                .into_iter()
                .find(|c| c.identity == invite.identity);
            let c = client.add_contact(invite, name).await?;
            Ok(json!({
                "ok": true,
                "name": c.name,
                "existed": existing.is_some(),
                "fingerprint": safety_number::display(&safety_number::fingerprint(&c.identity)),
            }))
        }
        "verify" => {
            let contact = field(req, "contact")?;
            client.set_verified(contact, true).await?;
            Ok(json!({"ok": true}))
        }
        other => bail!("unknown operation {other:?}"),
    }
}

/// Sends `req` to the process using the profile in `dir` and returns its
/// answer (`ok: true`), or the error it gave. `pid` names that process in
/// messages.
pub async fn request(dir: &Path, pid: Option<u32>, req: Value) -> anyhow::Result<Value> {
    let path: PathBuf = dir.join(SOCKET);
    let who = match pid {
        Some(p) => format!("another meshwhisper process (pid {p})"),
        None => "another meshwhisper process".to_string(),
    };
    let stream = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(_) => bail!(
            "the profile in {} is in use by {who}, which does not take commands \
             (only `listen` and `chat` do); stop it, or wait until it ends",
            dir.display()
        ),
    };
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{req}\n").as_bytes()).await?;
    w.shutdown().await?;
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST))
        .read_line(&mut line)
        .await
        .with_context(|| format!("reading the answer of {who}"))?;
    let v: Value = serde_json::from_str(&line)
        .with_context(|| format!("{who} gave no answer (did it stop?)"))?;
    if v["ok"] != true {
        bail!("{}", v["error"].as_str().unwrap_or("refused"));
    }
    Ok(v)
}
