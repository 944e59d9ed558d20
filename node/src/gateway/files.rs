//! Media (`/media`) and archives (`/archive/{id}`).

use super::*;

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub(super) async fn media_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Media, ip) {
        return r;
    }
    let max = s.core.store.config().media_max_bytes;
    let too_large = |s: &AppState| too_large(s, "Payload", max);
    if content_length(&headers).is_some_and(|n| n > max) {
        return too_large(&s);
    }
    let mut upload = match s.core.store.media().begin().await {
        Ok(u) => u,
        Err(e) => return internal(&s, e),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(&s, StatusCode::BAD_REQUEST, "Upload interrupted");
        };
        if !s.uploads.take(ip, chunk.len() as u64, now_ms()) {
            return over_quota(&s);
        }
        match upload.write(&chunk).await {
            Ok(()) => {}
            Err(meshwhisper_storage::Error::TooLarge { .. }) => return too_large(&s),
            Err(e) => return internal(&s, e),
        }
    }
    let meta = match upload.finish(now_ms()).await {
        Ok(m) => m,
        Err(e) => return internal(&s, e),
    };
    let base = match &s.cfg.base_url {
        Some(b) => b.strip_suffix('/').unwrap_or(b).to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "localhost:{}",
                        s.cfg.http.rsplit(':').next().unwrap_or("8080")
                    )
                });
            format!("http://{host}")
        }
    };
    json_resp(
        &s,
        StatusCode::OK,
        json!({ "id": meta.id.as_str(), "url": format!("{base}/media/{}", meta.id), "expiresAt": meta.expires_ms }),
    )
}

pub(super) async fn media_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = MediaId::parse(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    match s.core.store.media().open(&id, now_ms()).await {
        Ok(Some((meta, file))) => {
            let stream = tokio_util::io::ReaderStream::new(file);
            let mut r = Response::new(Body::from_stream(stream));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=604800"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
            cors(r)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Media not found or expired"),
        Err(e) => internal(&s, e),
    }
}

fn archive_owner(id: &str) -> Option<[u8; 32]> {
    if id.len() != 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    hex::decode(id).ok()?.try_into().ok()
}

pub(super) async fn archive_put(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let Some(owner) = archive_owner(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Archive, ip) {
        return r;
    }
    let Some(token) = bearer(&headers) else {
        return error(&s, StatusCode::UNAUTHORIZED, "Missing Authorization header");
    };
    let max = s.core.store.config().archive_max_bytes;
    let too_large = |s: &AppState| too_large(s, "Archive", max);
    if content_length(&headers).is_some_and(|n| n > max) {
        return too_large(&s);
    }
    let refused = |s: &AppState, e: meshwhisper_storage::Error| match e {
        meshwhisper_storage::Error::Unauthorized { .. } => {
            error(s, StatusCode::FORBIDDEN, "Invalid archive token")
        }
        meshwhisper_storage::Error::TooLarge { .. } => too_large(s),
        e => internal(s, e),
    };
    // The token first: a client without it is refused before its body is
    // read. Then the body streams to a file.
    let mut upload = match s.core.store.archive().begin(owner, &token).await {
        Ok(u) => u,
        Err(e) => return refused(&s, e),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(&s, StatusCode::BAD_REQUEST, "Upload interrupted");
        };
        if !s.uploads.take(ip, chunk.len() as u64, now_ms()) {
            return over_quota(&s);
        }
        if let Err(e) = upload.write(&chunk).await {
            return refused(&s, e);
        }
    }
    match upload.finish(now_ms()).await {
        Ok(size) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "size": size })),
        Err(e) => refused(&s, e),
    }
}

pub(super) async fn archive_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
) -> Response {
    let Some(owner) = archive_owner(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    match s.core.store.archive().get(owner, now_ms()).await {
        Ok(Some(bytes)) => {
            let mut r = Response::new(Body::from(bytes));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            cors(r)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Archive not found"),
        Err(e) => internal(&s, e),
    }
}

/// 413 for an upload over `max` bytes (`what`: "Payload" or "Archive").
fn too_large(s: &AppState, what: &str, max: u64) -> Response {
    error(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("{what} too large (max {max} bytes)"),
    )
}
