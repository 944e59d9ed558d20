//! The person-facing commands: `id`, `invite`, `contact`, `send`, `listen`
//! and `chat`, over the client SDK.
//!
//! Profiles live in the platform's data directory (on Linux
//! `~/.local/share/meshwhisper/profile`) unless `--profile` or
//! `MESHWHISPER_PROFILE` names another. One process uses a profile at a
//! time: `listen` and `chat` hold it while they run.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use libp2p::Multiaddr;
use meshwhisper_client::{
    Client, Config, ConnectionState, Event, Invite, MessageId, Profile, ReceiptKind,
};
use meshwhisper_crypto::safety_number;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncBufReadExt as _;

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
                let p = Profile::open(&profile.dir()?).await?;
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
        let p = Profile::open(&args.profile.dir()?).await?;
        let text = p.invite().to_text()?;
        println!("{text}");
        if args.qr {
            println!("{}", meshwhisper_client::invite::qr(&text)?);
        }
        Ok(())
    })
}

pub fn contact(cmd: ContactCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            ContactCommand::Add {
                profile,
                invite,
                name,
            } => {
                let mut p = Profile::open(&profile.dir()?).await?;
                let inv = Invite::from_text(&invite)?;
                let c = p.add_contact(&inv, name.as_deref()).await?;
                println!(
                    "added {} (fingerprint {})",
                    c.name,
                    safety_number::display(&safety_number::fingerprint(&c.identity))
                );
            }
            ContactCommand::List { profile } => {
                let mut p = Profile::open(&profile.dir()?).await?;
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
                let mut p = Profile::open(&profile.dir()?).await?;
                let number = p.safety_number(&name).await?;
                println!("{}", safety_number::display(&number));
                if confirm {
                    p.set_verified(&name, true).await?;
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

pub fn send(args: SendArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut cfg = Config::new(args.profile.dir()?);
        // Leave deliveries to the profile's listener.
        cfg.receive = false;
        let (client, mut events) = Client::start(cfg).await?;
        let id = client.send(&args.name, args.text.into_bytes()).await?;
        let deadline = Duration::from_secs(args.timeout);
        let r = tokio::time::timeout(deadline, async {
            loop {
                tokio::select! {
                    r = client.flush() => return r,
                    Some(e) = events.recv() => {
                        if let Event::Problem { message, .. } = e {
                            eprintln!("{message}");
                        }
                    }
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
                "not stored by a relay within {}s; it stays queued and is sent the next time this profile runs",
                args.timeout
            ),
        }
    })
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
    }
}

pub fn listen(args: ListenArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let (client, mut events) = Client::start(Config::new(args.profile.dir()?)).await?;
        let stop = crate::relay::wait_for_signal();
        tokio::pin!(stop);
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
        client.shutdown().await;
        Ok(())
    })
}

pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let (client, mut events) = Client::start(Config::new(args.profile.dir()?)).await?;
        let name = args.name;
        match client.history(&name, 20).await {
            Ok(history) => {
                for m in &history {
                    let who = if m.outgoing { "me" } else { name.as_str() };
                    println!("{who}> {}", String::from_utf8_lossy(&m.body));
                }
            }
            // They may be on their way: their first message adds them.
            Err(meshwhisper_client::Error::NoSuchContact(_)) => eprintln!(
                "  [{name} is not a contact yet: add their invite, or wait for their first message]"
            ),
            Err(e) => return Err(e.into()),
        }
        eprintln!("chatting with {name}: type a line and press Enter to send; Ctrl-D or Ctrl-C to leave");
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let stop = crate::relay::wait_for_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                l = stdin.next_line() => match l {
                    Ok(Some(l)) if l.trim().is_empty() => {}
                    Ok(Some(l)) => {
                        if let Err(e) = client.send(&name, l.into_bytes()).await {
                            eprintln!("! {e}");
                        }
                    }
                    _ => {
                        // Leave once what was typed is at the relay.
                        let c = client.clone();
                        if tokio::time::timeout(Duration::from_secs(30), c.flush()).await.is_err() {
                            eprintln!("! some messages are still queued; they are sent next time");
                        }
                        break;
                    }
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
                        Event::Problem { message, .. } => eprintln!("  [{message}]"),
                        _ => {}
                    }
                }
            }
        }
        client.shutdown().await;
        Ok(())
    })
}
