//! The prekey and username directory: `/directory`, `/namespace-policy`
//! and `/opks`.

use super::*;

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The rate limit of `bucket`, then the JSON object body: what every JSON
/// write endpoint checks first, in the reference's order.
fn limited_json(
    s: &AppState,
    bucket: Bucket,
    ip: IpAddr,
    body: &[u8],
) -> Result<Value, Box<Response>> {
    if let Some(r) = limited(s, bucket, ip) {
        return Err(Box::new(r));
    }
    parse_json(s, body)
}

fn parse_json(s: &AppState, body: &[u8]) -> Result<Value, Box<Response>> {
    if body.len() > s.cfg.limits.max_json_body {
        return Err(Box::new(error(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body too large",
        )));
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| Box::new(error(s, StatusCode::BAD_REQUEST, "Invalid JSON body")))
}

/// The identity key a directory entry is registered under: `publicKey`
/// as 64 hex digits (the Ed25519 identity key, as the JavaScript SDK and
/// our client send it).
pub(crate) fn identity_key(pk: &str) -> Option<[u8; 32]> {
    if pk.len() != 64 {
        return None;
    }
    hex::decode(pk).ok()?.try_into().ok()
}

/// Checks a prekey bundle against the key it is registered under, so
/// nobody can publish a bundle for someone else's identity. The
/// JavaScript SDK's formats (`version ‖ flags ‖ IK ‖ SPK ‖ sig(SPK)`, then
/// for 0x02 the ML-KEM-768 key) must carry `pk` as IK, a valid signature,
/// no embedded one-time prekey and their exact length; ours (0x81) must
/// decode, verify and name `pk`. Anything else is refused.
pub(crate) fn check_bundle(b: &[u8], pk: &[u8; 32]) -> Result<(), &'static str> {
    use meshwhisper_crypto::primitives::Ed25519Public;
    match b.first() {
        Some(v @ (0x01 | 0x02)) => {
            let want = if *v == 0x01 { 130 } else { 1314 };
            if b.len() != want {
                return Err("prekey bundle has the wrong length for its version");
            }
            if b[1] != 0 {
                return Err("prekey bundle must not embed a one-time prekey");
            }
            let (Ok(ik), Ok(sig)) = (
                <[u8; 32]>::try_from(&b[2..34]),
                <[u8; 64]>::try_from(&b[66..130]),
            ) else {
                return Err("prekey bundle is truncated");
            };
            if ik != *pk {
                return Err(
                    "prekey bundle identity key is not the publicKey it is registered under",
                );
            }
            let Ok(key) = Ed25519Public::from_bytes(&ik) else {
                return Err("prekey bundle identity key is invalid");
            };
            key.verify_lenient(&b[34..66], &sig)
                .map_err(|_| "prekey bundle signature is invalid")
        }
        Some(&meshwhisper_crypto::pqxdh::BUNDLE_VERSION) => {
            match meshwhisper_crypto::pqxdh::PrekeyBundle::decode(b) {
                Ok(bundle) if bundle.identity().to_bytes() == *pk => Ok(()),
                Ok(_) => {
                    Err("prekey bundle identity key is not the publicKey it is registered under")
                }
                Err(_) => Err("prekey bundle signature or encoding is invalid"),
            }
        }
        _ => Err("prekey bundle version is not one this relay knows"),
    }
}

pub(super) async fn directory_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk), Some(bundle)) = (
        str_field(&v, "namespace"),
        str_field(&v, "publicKey"),
        str_field(&v, "bundle"),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey, bundle",
        );
    };
    let Some(key) = identity_key(pk) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Invalid publicKey: 64 hex digits (the Ed25519 identity key)",
        );
    };
    let Ok(bundle) = B64.decode(bundle) else {
        return error(&s, StatusCode::BAD_REQUEST, "Invalid bundle: not base64");
    };
    if let Err(why) = check_bundle(&bundle, &key) {
        s.metrics.bundles_refused.fetch_add(1, Relaxed);
        return error(&s, StatusCode::BAD_REQUEST, why);
    }
    // Our own format names its signed prekey: never roll back to an older one.
    if bundle.first() == Some(&meshwhisper_crypto::pqxdh::BUNDLE_VERSION)
        && let Ok(Some(old)) = s.core.store.directory().by_key(ns, pk).await
        && crate::device::directory::is_stale(&old.bundle, &bundle)
    {
        return error(
            &s,
            StatusCode::CONFLICT,
            "prekey bundle is older than the one published",
        );
    }
    let js_format = matches!(bundle.first(), Some(0x01 | 0x02));
    let username = match v.get("username") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => {
            if meshwhisper_storage::directory::normalize_username(u).is_none() {
                return error(
                    &s,
                    StatusCode::BAD_REQUEST,
                    "Invalid username: 3–30 chars, a–z 0–9 _ -",
                );
            }
            Some(u.clone())
        }
        Some(_) => {
            return error(
                &s,
                StatusCode::BAD_REQUEST,
                "Invalid username: 3–30 chars, a–z 0–9 _ -",
            );
        }
    };
    let transfer = match v.get("transferAuth") {
        None | Some(Value::Null) => None,
        Some(t) => {
            let from = str_field(t, "fromPublicKey");
            let exp = t.get("expiresAt").and_then(Value::as_f64);
            let sig = str_field(t, "signature").and_then(|x| B64.decode(x).ok());
            match (from, exp, sig) {
                (Some(from), Some(exp), Some(sig)) if exp >= 0.0 => Some(TransferAuth {
                    from_public_key: from.to_string(),
                    expires_at_ms: exp as u64,
                    signature: sig,
                }),
                _ => return error(&s, StatusCode::BAD_REQUEST, "Invalid transferAuth shape"),
            }
        }
    };
    let reg = Registration {
        namespace: ns.to_string(),
        public_key: pk.to_string(),
        bundle,
        username,
        transfer,
    };
    use meshwhisper_storage::Error as E;
    match s
        .core
        .store
        .directory()
        .register(reg, s.verifier.clone(), now_ms())
        .await
    {
        Ok(()) => {
            // The publisher may add unsigned one-time prekeys now, and the
            // ones it uploaded just before are promoted.
            if js_format {
                let parked = s.opks.lock().map_or_else(
                    |p| p.into_inner().published(ns, pk, ip, now_ms()),
                    |mut b| b.published(ns, pk, ip, now_ms()),
                );
                if !parked.is_empty()
                    && let Err(e) = s
                        .core
                        .store
                        .directory()
                        .add_one_time_prekeys(ns, pk, parked)
                        .await
                {
                    tracing::debug!(error = %e, "parked one-time prekeys not stored");
                }
            }
            json_resp(&s, StatusCode::OK, json!({ "ok": true }))
        }
        Err(E::UsernameTaken) => error(
            &s,
            StatusCode::CONFLICT,
            "Username already claimed by a different identity in this namespace",
        ),
        Err(E::TransferRejected(_)) => error(
            &s,
            StatusCode::FORBIDDEN,
            "transferAuth invalid: signature, expiry, or sender mismatch",
        ),
        Err(E::TooLarge { .. }) => {
            error(&s, StatusCode::PAYLOAD_TOO_LARGE, "Prekey bundle too large")
        }
        Err(E::Invalid { why, .. }) => error(&s, StatusCode::BAD_REQUEST, why),
        Err(e) => internal(&s, e),
    }
}

/// The non-empty `namespace` query parameter.
fn namespace_param(q: &HashMap<String, String>) -> Option<&str> {
    q.get("namespace")
        .filter(|x| !x.is_empty())
        .map(String::as_str)
}

/// The 400 the reference answers without a `namespace`.
fn missing_namespace(s: &AppState) -> Response {
    error(s, StatusCode::BAD_REQUEST, "Missing query param: namespace")
}

pub(super) async fn directory_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    let Some(ns) = namespace_param(&q) else {
        return missing_namespace(&s);
    };
    let d = s.core.store.directory();
    if let Some(u) = q.get("username").filter(|x| !x.is_empty()) {
        return match d.by_username(ns, u).await {
            Ok(Some(e)) => json_resp(
                &s,
                StatusCode::OK,
                json!({ "bundle": B64.encode(&e.bundle), "publicKey": e.public_key, "username": e.username }),
            ),
            Ok(None) => error(&s, StatusCode::NOT_FOUND, "User not found"),
            Err(meshwhisper_storage::Error::Invalid { .. }) => {
                error(&s, StatusCode::BAD_REQUEST, "Invalid username")
            }
            Err(e) => internal(&s, e),
        };
    }
    let Some(pk) = q.get("publicKey").filter(|x| !x.is_empty()) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query param: publicKey or username",
        );
    };
    match d.by_key(ns, pk).await {
        Ok(Some(e)) => {
            let mut body = json!({ "bundle": B64.encode(&e.bundle) });
            if let Some(u) = e.username {
                body["username"] = Value::String(u);
            }
            json_resp(&s, StatusCode::OK, body)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Prekey bundle not found"),
        Err(e) => internal(&s, e),
    }
}

pub(super) async fn policy_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(ns) = str_field(&v, "namespace") else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required field: namespace",
        );
    };
    let Some(policy) = str_field(&v, "usernamePolicy").and_then(UsernamePolicy::parse) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "usernamePolicy must be 'signed-transfer' or 'last-writer-wins'",
        );
    };
    match s.core.store.directory().set_policy(ns, policy).await {
        Ok(()) => json_resp(
            &s,
            StatusCode::OK,
            json!({ "ok": true, "usernamePolicy": policy.as_str() }),
        ),
        Err(meshwhisper_storage::Error::PolicyConflict { current }) => json_resp(
            &s,
            StatusCode::CONFLICT,
            json!({ "error": "Namespace policy already set to a different value", "currentPolicy": current.as_str() }),
        ),
        Err(
            meshwhisper_storage::Error::Invalid { why, .. }
            | meshwhisper_storage::Error::TooLarge { what: why, .. },
        ) => error(&s, StatusCode::BAD_REQUEST, why),
        Err(e) => internal(&s, e),
    }
}

pub(super) async fn policy_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    let Some(ns) = namespace_param(&q) else {
        return missing_namespace(&s);
    };
    match s.core.store.directory().policy(ns).await {
        Ok(p) => json_resp(
            &s,
            StatusCode::OK,
            json!({ "namespace": ns, "usernamePolicy": p.as_str() }),
        ),
        Err(e) => internal(&s, e),
    }
}

pub(super) async fn opks_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk), Some(list)) = (
        str_field(&v, "namespace"),
        str_field(&v, "publicKey"),
        v.get("opks").and_then(Value::as_array),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey, opks[]",
        );
    };
    if identity_key(pk).is_none() {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Invalid publicKey: 64 hex digits (the Ed25519 identity key)",
        );
    }
    // As the reference: the first `opk_max_per_upload` entries, minus empty
    // and non-string ones; each an X25519 public key.
    let max = s.core.store.config().opk_max_per_upload;
    let mut keys = Vec::new();
    for item in list.iter().take(max) {
        let Some(text) = item.as_str().filter(|t| !t.is_empty()) else {
            continue;
        };
        match B64.decode(text) {
            Ok(k) if k.len() == 32 => keys.push(k),
            Ok(_) => {
                return error(
                    &s,
                    StatusCode::BAD_REQUEST,
                    "Invalid opk: not a 32-byte X25519 public key",
                );
            }
            Err(_) => return error(&s, StatusCode::BAD_REQUEST, "Invalid opk: not base64"),
        }
    }
    if keys.is_empty() {
        return error(&s, StatusCode::BAD_REQUEST, "Invalid opks: none given");
    }
    // Bound to the identity's publisher (see `opk_binding`); identities of
    // our own format upload signed batches over the device protocol.
    let published = match s.core.store.directory().by_key(ns, pk).await {
        Ok(e) => e.map(|e| e.bundle.first().copied()),
        Err(e) => return internal(&s, e),
    };
    if published == Some(Some(meshwhisper_crypto::pqxdh::BUNDLE_VERSION)) {
        return error(
            &s,
            StatusCode::FORBIDDEN,
            "this identity uploads signed one-time prekey batches",
        );
    }
    let n = keys.len();
    let decision = {
        let mut b = match s.opks.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        b.upload(ns, pk, ip, now_ms(), published.is_some(), keys.clone())
    };
    match decision {
        opk_binding::Decision::Accept => {}
        opk_binding::Decision::Parked => {
            return json_resp(&s, StatusCode::OK, json!({ "ok": true, "stored": n }));
        }
        opk_binding::Decision::Refuse(why) => {
            s.metrics.opk_uploads_refused.fetch_add(1, Relaxed);
            return error(&s, StatusCode::FORBIDDEN, why);
        }
    }
    match s
        .core
        .store
        .directory()
        .add_one_time_prekeys(ns, pk, keys)
        .await
    {
        Ok(stored) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "stored": stored })),
        Err(meshwhisper_storage::Error::TooLarge { .. }) => {
            error(&s, StatusCode::BAD_REQUEST, "Invalid opk: too large")
        }
        Err(meshwhisper_storage::Error::Invalid { why, .. }) => {
            error(&s, StatusCode::BAD_REQUEST, why)
        }
        Err(e) => internal(&s, e),
    }
}

pub(super) async fn opks_claim(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Dir, ip) {
        return r;
    }
    let (Some(ns), Some(pk)) = (
        q.get("namespace").filter(|x| !x.is_empty()),
        q.get("publicKey").filter(|x| !x.is_empty()),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query params: namespace, publicKey",
        );
    };
    match s.core.store.directory().claim_one_time_prekey(ns, pk).await {
        Ok(Some(k)) => json_resp(&s, StatusCode::OK, json!({ "opk": B64.encode(k) })),
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "No one-time pre-keys available"),
        Err(e) => internal(&s, e),
    }
}

pub(super) async fn opks_delete(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Dir, ip) {
        return r;
    }
    let Some(token) = bearer(&headers) else {
        return error(&s, StatusCode::UNAUTHORIZED, "Missing bearer token");
    };
    let v = match parse_json(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk)) = (str_field(&v, "namespace"), str_field(&v, "publicKey")) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey",
        );
    };
    match s
        .core
        .store
        .directory()
        .purge_one_time_prekeys(ns, pk, &token)
        .await
    {
        Ok(n) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "deleted": n })),
        Err(meshwhisper_storage::Error::Unauthorized { .. }) => {
            error(&s, StatusCode::FORBIDDEN, "Invalid OPK pool token")
        }
        Err(e) => internal(&s, e),
    }
}
