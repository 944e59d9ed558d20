//! The person-facing commands: `id`, `invite`, `contact`, `send`, `listen`
//! and `chat`, over the client SDK.
//!
//! Profiles live in the platform's data directory (on Linux
//! `~/.local/share/meshwhisper/profile`) unless `--profile` or
//! `MESHWHISPER_PROFILE` names another. One process uses a profile at a
//! time: `listen` and `chat` hold it while they run. Beside them, read-only
//! commands (`id show`, `invite`, `contact list`, `contact verify`) open
//! the profile read-only, and `send`, `contact add` and `contact verify
//! --confirm` are handed to the running process (see `control`).

use crate::control;
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use libp2p::{Multiaddr, PeerId};
use meshwhisper_client::{
    Client, Config, ConnectionState, Event, Invite, MessageId, Profile, ReceiptKind,
};
use meshwhisper_crypto::safety_number;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ProfileArg {
    /// Profile directory (default: the platform data directory's
    /// meshwhisper/profile).
    #[arg(long, env = "MESHWHISPER_PROFILE", global = true)]
    profile: Option<PathBuf>,
}

impl ProfileArg {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.profile {
            return Ok(p.clone());
        }
        let dirs = directories::ProjectDirs::from("org", "MeshWhisper", "meshwhisper")
            .context("no home directory: give --profile")?;
        Ok(dirs.data_dir().join("profile"))
    }
}

#[derive(Debug, Subcommand)]
pub enum IdCommand {
    /// Create a profile with a new identity, homed on a relay.
    New {
        #[command(flatten)]
        profile: ProfileArg,
        /// The home relay: a multiaddr ending in /p2p/<PeerId> (repeatable,
        /// e.g. its TCP and QUIC addresses; see the relay's `listen=` lines).
        #[arg(long, value_name = "MULTIADDR", required = true)]
        relay: Vec<Multiaddr>,
        /// The name your invite suggests to others.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Show the profile's identity and home relay.
    Show {
        #[command(flatten)]
        profile: ProfileArg,
    },
}

#[derive(Debug, Args)]
pub struct InviteArgs {
    #[command(flatten)]
    profile: ProfileArg,
    /// Also draw the invite as a QR code.
    #[arg(long)]
    qr: bool,
}

#[derive(Debug, Subcommand)]
pub enum ContactCommand {
    /// Add a contact from their invite.
    Add {
        #[command(flatten)]
        profile: ProfileArg,
        /// The invite string (MW1...).
        invite: String,
        /// The name to know them by (default: the name in the invite).
        #[arg(long)]
        name: Option<String>,
    },
    /// List contacts.
    List {
        #[command(flatten)]
        profile: ProfileArg,
    },
    /// Show the safety number to compare with a contact (in person or on a
    /// call); `--confirm` records that it matched.
    Verify {
        #[command(flatten)]
        profile: ProfileArg,
        /// The contact.
        name: String,
        /// Mark the contact as verified.
        #[arg(long)]
        confirm: bool,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    profile: ProfileArg,
    /// The contact.
    name: String,
    /// The message.
    text: String,
    /// How long to wait for the relay to store it, in seconds (the
    /// message stays queued in the profile if it cannot be sent in time).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    profile: ProfileArg,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    profile: ProfileArg,
    /// The contact.
    name: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    crate::relay::init_logging("warn");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn id(cmd: IdCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            IdCommand::New {
                profile,
                relay,
                name,
            } => {
                let dir = profile.dir()?;
                let p = Profile::create(&dir, &relay, &name).await?;
                println!("profile={}", dir.display());
                print_identity(&p);
            }
            IdCommand::Show { profile } => {
                let p = Profile::open_read_only(&profile.dir()?).await?;
                println!("profile={}", p.dir().display());
                print_identity(&p);
            }
        }
        Ok(())
    })
}

fn print_identity(p: &Profile) {
    let (relay, addrs) = p.relay();
    println!("identity={}", hex::encode(p.identity().to_bytes()));
    println!("fingerprint={}", safety_number::display(&p.fingerprint()));
    println!("relay={relay}");
    for a in addrs {
        println!("relay_addr={a}");
    }
}

pub fn invite(args: InviteArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let p = Profile::open_read_only(&args.profile.dir()?).await?;
        let text = p.invite().to_text()?;
        println!("{text}");
        if args.qr {
            println!("{}", meshwhisper_client::invite::qr(&text)?);
        }
        Ok(())
    })
}

/// A profile opened to change it, or the process that has it open.
enum Access {
    Own(Box<Profile>),
    Running { dir: PathBuf, pid: Option<u32> },
}

async fn open_for_change(dir: PathBuf) -> anyhow::Result<Access> {
    match Profile::open(&dir).await {
        Ok(p) => Ok(Access::Own(Box::new(p))),
        Err(meshwhisper_client::Error::ProfileInUse { pid, .. }) => {
            Ok(Access::Running { dir, pid })
        }
        Err(e) => Err(e.into()),
    }
}

fn print_added(name: &str, existed: bool, asked: Option<&str>, fingerprint: &str) {
    if existed {
        println!(
            "already a contact as {name} (fingerprint {fingerprint}); their home relay was updated from this invite"
        );
        if let Some(a) = asked.filter(|a| *a != name) {
            eprintln!("--name {a} not applied: the contact keeps the name {name}");
        }
    } else {
        println!("added {name} (fingerprint {fingerprint})");
    }
}

pub fn contact(cmd: ContactCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            ContactCommand::Add {
                profile,
                invite,
                name,
            } => {
                // Checked here first, so a bad invite is refused the same way
                // whether or not another process has the profile.
                let inv = Invite::from_text(&invite)?;
                match open_for_change(profile.dir()?).await? {
                    Access::Own(mut p) => {
                        let existed = p
                            .contacts()
                            .await?
                            .iter()
                            .any(|c| c.identity == inv.identity);
                        let c = p.add_contact(&inv, name.as_deref()).await?;
                        let fp = safety_number::display(&safety_number::fingerprint(&c.identity));
                        print_added(&c.name, existed, name.as_deref(), &fp);
                    }
                    Access::Running { dir, pid } => {
                        let v = control::request(
                            &dir,
                            pid,
                            serde_json::json!({"op": "add-contact", "invite": invite, "name": name}),
                        )
                        .await?;
                        print_added(
                            v["name"].as_str().unwrap_or_default(),
                            v["existed"] == true,
                            name.as_deref(),
                            v["fingerprint"].as_str().unwrap_or_default(),
                        );
                    }
                }
            }
            ContactCommand::List { profile } => {
                let mut p = Profile::open_read_only(&profile.dir()?).await?;
                for c in p.contacts().await? {
                    println!(
                        "{}\t{}\t{}\t{}",
                        c.name,
                        if c.verified { "verified" } else { "unverified" },
                        hex::encode(c.identity.to_bytes()),
                        c.relay
                    );
                }
            }
            ContactCommand::Verify {
                profile,
                name,
                confirm,
            } => {
                let dir = profile.dir()?;
                let mut p = Profile::open_read_only(&dir).await?;
                let number = p.safety_number(&name).await?;
                println!("{}", safety_number::display(&number));
                drop(p);
                if confirm {
                    match open_for_change(dir).await? {
                        Access::Own(mut p) => p.set_verified(&name, true).await?,
                        Access::Running { dir, pid } => {
                            control::request(
                                &dir,
                                pid,
                                serde_json::json!({"op": "verify", "contact": name}),
                            )
                            .await?;
                        }
                    }
                    eprintln!("{name} marked as verified");
                } else {
                    eprintln!(
                        "Compare these 60 digits with {name}; if they match, run again with --confirm."
                    );
                }
            }
        }
        Ok(())
    })
}

/// "12D3Koo… at /ip4/…" for messages about a relay.
fn relay_words(relay: &PeerId, addrs: &[Multiaddr]) -> String {
    match addrs.first() {
        Some(a) => format!("relay {relay} at {a}"),
        None => format!("relay {relay}"),
    }
}

fn unreachable_text(
    relay: &PeerId,
    addrs: &[Multiaddr],
    home: bool,
    reason: &str,
    retry_in: Option<Duration>,
) -> String {
    let whose = if home { "your home " } else { "the contact's " };
    let retry = retry_in
        .map(|d| format!("; retrying in {}s", d.as_secs().max(1)))
        .unwrap_or_default();
    format!(
        "{whose}{} is unreachable ({reason}){retry}; messages wait in the outbox and go when it is back",
        relay_words(relay, addrs)
    )
}

pub fn send(args: SendArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let dir = args.profile.dir()?;
        let mut cfg = Config::new(&dir);
        // Leave deliveries to the profile's listener.
        cfg.receive = false;
        let (client, mut events) = match Client::start(cfg).await {
            Ok(c) => c,
            Err(meshwhisper_client::Error::ProfileInUse { pid, .. }) => {
                return send_through(&dir, pid, &args).await;
            }
            Err(e) => return Err(e.into()),
        };
        let id = client.send(&args.name, args.text.into_bytes()).await?;
        let deadline = Duration::from_secs(args.timeout);
        let mut unreachable: Option<String> = None;
        let r = tokio::time::timeout(deadline, async {
            loop {
                tokio::select! {
                    r = client.flush() => return r,
                    Some(e) = events.recv() => match e {
                        Event::Problem { message, .. } => eprintln!("{message}"),
                        Event::Unreachable { relay, addrs, home, reason, retry_in } => {
                            eprintln!("{}", unreachable_text(&relay, &addrs, home, &reason, retry_in));
                            unreachable = Some(format!("{} is unreachable ({reason})", relay_words(&relay, &addrs)));
                        }
                        _ => {}
                    },
                }
            }
        })
        .await;
        client.shutdown().await;
        match r {
            Ok(Ok(())) => {
                println!("sent {}", hex::encode(id));
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!(
                "message {} not stored by a relay within {}s{}; it is kept in this profile's outbox \
                 and goes out when the relay is reachable and this profile runs \
                 (`meshwhisper listen`, `chat` or `send`)",
                hex::encode(id),
                args.timeout,
                unreachable.map(|u| format!(": {u}")).unwrap_or_default()
            ),
        }
    })
}

/// `send` while `listen` or `chat` has the profile: that process sends it.
async fn send_through(
    dir: &std::path::Path,
    pid: Option<u32>,
    args: &SendArgs,
) -> anyhow::Result<()> {
    let v = control::request(
        dir,
        pid,
        serde_json::json!({
            "op": "send",
            "contact": args.name,
            "text": args.text,
            "waitMs": args.timeout.saturating_mul(1000),
        }),
    )
    .await?;
    let id = v["id"].as_str().unwrap_or_default();
    let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
    if v["stored"] == true {
        println!("sent {id}");
        eprintln!("handed to the meshwhisper process using this profile{who}");
        Ok(())
    } else {
        bail!(
            "message {id} handed to the meshwhisper process using this profile{who}, \
             but not stored by a relay within {}s; that process keeps it in the outbox and sends it when the relay is reachable",
            args.timeout
        )
    }
}

fn line(e: &Event) -> Option<String> {
    let ids = |ids: &[MessageId]| ids.iter().map(hex::encode).collect::<Vec<_>>().join(",");
    Some(match e {
        Event::Message(m) => format!(
            "message {} {} {}",
            m.contact,
            hex::encode(m.id),
            String::from_utf8_lossy(&m.body)
                .replace('\\', "\\\\")
                .replace('\n', "\\n")
        ),
        Event::Sent { contact, id } => format!("sent {contact} {}", hex::encode(id)),
        Event::Receipt {
            contact,
            kind,
            ids: i,
        } => format!(
            "{} {contact} {}",
            match kind {
                ReceiptKind::Delivered => "delivered",
                ReceiptKind::Read => "read",
            },
            ids(i)
        ),
        Event::ContactAdded(c) => format!(
            "contact-added {} {}",
            c.name,
            hex::encode(c.identity.to_bytes())
        ),
        Event::Connection(s) => format!(
            "connection {}",
            match s {
                ConnectionState::Connected => "connected",
                ConnectionState::Disconnected => "disconnected",
            }
        ),
        Event::PrekeysPublished { one_time } => format!("prekeys {one_time}"),
        Event::Problem { contact, message } => {
            format!("problem {} {message}", contact.as_deref().unwrap_or("-"))
        }
        Event::Unreachable {
            relay,
            addrs,
            home,
            reason,
            retry_in,
        } => format!(
            "unreachable {}",
            unreachable_text(relay, addrs, *home, reason, *retry_in)
        ),
    })
}

fn json(e: &Event) -> serde_json::Value {
    use serde_json::json;
    let ids = |ids: &[MessageId]| ids.iter().map(hex::encode).collect::<Vec<_>>();
    match e {
        Event::Message(m) => json!({
            "event": "message", "contact": m.contact, "id": hex::encode(m.id),
            "sentMs": m.sent_ms, "text": String::from_utf8_lossy(&m.body),
        }),
        Event::Sent { contact, id } => {
            json!({"event": "sent", "contact": contact, "id": hex::encode(id)})
        }
        Event::Receipt {
            contact,
            kind,
            ids: i,
        } => json!({
            "event": match kind { ReceiptKind::Delivered => "delivered", ReceiptKind::Read => "read" },
            "contact": contact, "ids": ids(i),
        }),
        Event::ContactAdded(c) => json!({
            "event": "contact-added", "contact": c.name,
            "identity": hex::encode(c.identity.to_bytes()),
        }),
        Event::Connection(s) => json!({
            "event": "connection",
            "state": match s { ConnectionState::Connected => "connected", ConnectionState::Disconnected => "disconnected" },
        }),
        Event::PrekeysPublished { one_time } => {
            json!({"event": "prekeys", "oneTime": one_time})
        }
        Event::Problem { contact, message } => {
            json!({"event": "problem", "contact": contact, "message": message})
        }
        Event::Unreachable {
            relay,
            addrs,
            home,
            reason,
            retry_in,
        } => json!({
            "event": "unreachable", "relay": relay.to_string(),
            "addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "home": home, "reason": reason,
            "retryInMs": retry_in.map(|d| d.as_millis() as u64),
        }),
    }
}

pub fn listen(args: ListenArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let dir = args.profile.dir()?;
        let stop = crate::relay::wait_for_signal();
        tokio::pin!(stop);
        let (client, mut events) = Client::start(Config::new(&dir)).await?;
        let control = tokio_util::sync::CancellationToken::new();
        control::serve(&dir, client.clone(), control.clone());
        let mut out = std::io::stdout().lock();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                e = events.recv() => {
                    let Some(e) = e else { break };
                    let text = if args.json { Some(json(&e).to_string()) } else { line(&e) };
                    if let Some(t) = text {
                        // A closed stdout (e.g. `| head`) ends the listener.
                        if writeln!(out, "{t}").and_then(|()| out.flush()).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        drop(out);
        control.cancel();
        client.shutdown().await;
        Ok(())
    })
}

/// Lines typed on standard input, read on a thread of their own: a read
/// blocked in the terminal must not keep the process alive after Ctrl-C
/// (the runtime would wait for a blocking task; it does not wait for this
/// thread). `None` at end of input (Ctrl-D) or on a read error.
fn stdin_lines() -> tokio::sync::mpsc::Receiver<Option<String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            let got = match std::io::BufRead::read_line(&mut stdin.lock(), &mut line) {
                Ok(0) | Err(_) => None,
                Ok(_) => Some(line.trim_end_matches(['\n', '\r']).to_string()),
            };
            let end = got.is_none();
            if tx.blocking_send(got).is_err() || end {
                break;
            }
        }
    });
    rx
}

pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let dir = args.profile.dir()?;
        let name = args.name;
        // Refused before the network starts, like `send`.
        let history = {
            let mut p = Profile::open_read_only(&dir).await?;
            match p.history(&name, 20).await {
                Ok(h) => h,
                Err(meshwhisper_client::Error::NoSuchContact(_)) => bail!(
                    "no contact named {name:?} (`meshwhisper contact list` shows them; \
                     `meshwhisper contact add <invite>` adds one)"
                ),
                Err(e) => return Err(e.into()),
            }
        };
        let (client, mut events) = Client::start(Config::new(&dir)).await?;
        let control = tokio_util::sync::CancellationToken::new();
        control::serve(&dir, client.clone(), control.clone());
        for m in &history {
            let who = if m.outgoing { "me" } else { name.as_str() };
            println!("{who}> {}", String::from_utf8_lossy(&m.body));
        }
        let stop = crate::relay::wait_for_signal();
        tokio::pin!(stop);
        eprintln!("chatting with {name}: type a line and press Enter to send; Ctrl-D or Ctrl-C to leave");
        let mut stdin = stdin_lines();
        let mut interrupted = false;
        loop {
            tokio::select! {
                _ = &mut stop => {
                    interrupted = true;
                    break;
                }
                l = stdin.recv() => match l.flatten() {
                    Some(l) if l.trim().is_empty() => {}
                    Some(l) => {
                        if let Err(e) = client.send(&name, l.into_bytes()).await {
                            eprintln!("! {e}");
                        }
                    }
                    None => break,
                },
                e = events.recv() => {
                    let Some(e) = e else { break };
                    match e {
                        Event::Message(m) if m.contact == name => {
                            println!("{name}> {}", String::from_utf8_lossy(&m.body));
                            let _ = client.mark_read(&name, vec![m.id]).await;
                        }
                        Event::Message(m) => {
                            println!("({})> {}", m.contact, String::from_utf8_lossy(&m.body));
                        }
                        Event::Receipt { contact, kind, ids } if contact == name => {
                            let k = if kind == ReceiptKind::Read { "read" } else { "delivered" };
                            eprintln!("  [{k}: {} message(s)]", ids.len());
                        }
                        Event::ContactAdded(c) => eprintln!("  [new contact: {}]", c.name),
                        Event::Connection(ConnectionState::Connected) => eprintln!("  [connected]"),
                        Event::Connection(ConnectionState::Disconnected) => eprintln!("  [disconnected; reconnecting]"),
                        Event::Unreachable { relay, addrs, home, reason, retry_in } => {
                            eprintln!("  [{}]", unreachable_text(&relay, &addrs, home, &reason, retry_in));
                        }
                        Event::Problem { message, .. } => eprintln!("  [{message}]"),
                        _ => {}
                    }
                }
            }
        }
        control.cancel();
        // At end of input, leave once what was typed is at the relay
        // (bounded); Ctrl-C leaves at once (queued messages are kept).
        if !interrupted
            && tokio::time::timeout(Duration::from_secs(10), client.flush())
                .await
                .is_err()
        {
            eprintln!("! some messages are still queued; they are sent the next time this profile runs");
        }
        client.shutdown().await;
        Ok(())
    })
}
