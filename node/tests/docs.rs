//! The operator documentation cannot drift from the program: every
//! setting, environment variable and metric the docs name exists, and
//! every setting and metric the program has is documented.

mod common;

use meshwhisper_node::config::{Config, Overrides};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn docs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(docs_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `a_{x,y}_b` → `a_x_b`, `a_y_b` (one brace group at most).
fn expand(token: &str) -> Vec<String> {
    match (token.find('{'), token.find('}')) {
        (Some(a), Some(b)) if a < b => token[a + 1..b]
            .split(',')
            .map(|alt| format!("{}{}{}", &token[..a], alt.trim(), &token[b + 1..]))
            .collect(),
        _ => vec![token.to_string()],
    }
}

/// Backticked spans of `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Every leaf key of the configuration, dotted (`limits.client_queue`),
/// optional ones included.
fn config_keys() -> BTreeSet<String> {
    let mut c = Config {
        db_path: Some("x".into()),
        base_url: Some("x".into()),
        push_webhook_url: Some("x".into()),
        ..Config::default()
    };
    c.federation.blocklist_file = Some("x".into());
    let v: toml::Value = toml::from_str(&c.to_toml()).expect("toml");
    let mut keys = BTreeSet::new();
    for (k, v) in v.as_table().expect("table") {
        match v.as_table() {
            Some(t) => {
                for inner in t.keys() {
                    keys.insert(format!("{k}.{inner}"));
                }
            }
            None => {
                keys.insert(k.clone());
            }
        }
    }
    keys
}

/// First-column code spans of every table whose header's first cell is
/// `header`, across `text`.
fn table_column(text: &str, header: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            inside = false;
            continue;
        }
        let first = line
            .trim_matches('|')
            .split('|')
            .next()
            .unwrap_or("")
            .trim();
        if first == header {
            inside = true;
            continue;
        }
        if inside && !first.starts_with("---") {
            for span in code_spans(first) {
                out.extend(expand(span));
            }
        }
    }
    out
}

#[test]
fn every_documented_setting_exists_and_every_setting_is_documented() {
    let keys = config_keys();
    let ops = read("operations.md");
    let documented: BTreeSet<String> = table_column(&ops, "key").into_iter().collect();
    let unknown: Vec<&String> = documented.iter().filter(|k| !keys.contains(*k)).collect();
    assert!(
        unknown.is_empty(),
        "docs/operations.md names settings the config rejects: {unknown:?}"
    );
    let missing: Vec<&String> = keys.iter().filter(|k| !documented.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "settings missing from docs/operations.md's key tables: {missing:?}"
    );
    // Other documents name settings by their dotted key too.
    for name in ["federation.md", "quickstart.md", "client.md"] {
        for span in code_spans(&read(name)) {
            for k in expand(span) {
                let dotted = ["storage.", "limits.", "federation."]
                    .iter()
                    .any(|p| k.starts_with(p));
                if dotted
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
                {
                    assert!(keys.contains(&k), "docs/{name} names unknown setting {k}");
                }
            }
        }
    }
}

#[test]
fn every_documented_environment_variable_is_read() {
    let ops = read("operations.md");
    let vars: Vec<String> = table_column(&ops, "variable")
        .into_iter()
        .filter(|v| v.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(vars.len() > 10, "{vars:?}");
    let base = Config::load(None, |_| None, &Overrides::default()).expect("defaults");
    for var in vars {
        if var == "RUST_LOG" {
            continue; // read by the logger, not the config
        }
        // Unset, the defaults load; set, a value is refused or changes
        // something.
        let read = ["1", "not-a-valid-value"].iter().any(|value| {
            match Config::load(
                None,
                |k| (k == var).then(|| value.to_string()),
                &Overrides::default(),
            ) {
                Err(_) => true,
                Ok(c) => c != base,
            }
        });
        assert!(read, "docs name {var} but setting it does nothing");
    }
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.strip_prefix("# TYPE ").unwrap_or(line);
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// Crate names look like metric names in prose (`meshwhisper_node=debug`).
const CRATES: [&str; 6] = [
    "meshwhisper_node",
    "meshwhisper_client",
    "meshwhisper_storage",
    "meshwhisper_crypto",
    "meshwhisper_behaviour",
    "meshwhisper_tests",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_and_every_metric_is_documented() {
    let relay = common::start(|_| {}).await;
    let text = String::from_utf8(common::get(&format!("{}/metrics", relay.base)).await.body)
        .expect("utf8");
    let exported = metric_names(&text);
    assert!(exported.len() > 30, "{exported:?}");
    let mut documented = BTreeSet::new();
    let mut suffixes = BTreeSet::new();
    for entry in std::fs::read_dir(docs_dir()).expect("docs") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let doc = std::fs::read_to_string(&path).expect("read");
        for span in code_spans(&doc) {
            let mut token: String = span
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '{' | '}' | ','))
                .collect();
            // `name{label}` or an unclosed `name{label=...`: labels, not
            // alternatives (those are followed by more of the name).
            if let Some(open) = token.find('{')
                && token.find('}').is_none_or(|close| close + 1 == token.len())
            {
                token.truncate(open);
            }
            for name in expand(&token) {
                let name = name.trim_end_matches(',').to_string();
                if name.starts_with("meshwhisper_") && !name.ends_with('_') {
                    if CRATES.contains(&name.as_str()) {
                        continue;
                    }
                    assert!(
                        exported.contains(&name),
                        "{} names metric {name}, which /metrics does not export",
                        path.display()
                    );
                    documented.insert(name);
                } else if name.starts_with('_') && name.len() > 1 {
                    // `_suffix` shorthand after a family named in full.
                    suffixes.insert(name);
                }
            }
        }
    }
    let undocumented: Vec<&String> = exported
        .iter()
        .filter(|m| {
            !documented.contains(*m)
                && !m
                    .strip_prefix("meshwhisper_federation")
                    .is_some_and(|s| suffixes.contains(s))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics no document names: {undocumented:?}"
    );
    relay.stop().await;
}

#[test]
fn licenses_and_setup_prerequisites_are_there() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for f in ["LICENSE-MIT", "LICENSE-APACHE"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(text.len() > 1000, "{f} is not a license text");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let setup = readme
        .split("## Set-up")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Set-up section");
    for needed in ["Rust", "C compiler", "Node.js", "npm", "curl"] {
        assert!(setup.contains(needed), "Set-up does not name {needed}");
    }
    // The migration notes say how our federation default differs.
    let ops = read("operations.md");
    assert!(ops.contains("FEDERATION_MODE") && ops.contains("reference relay does not federate"));
}
