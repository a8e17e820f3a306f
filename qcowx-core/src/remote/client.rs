//! The HTTP client of an S3-compatible store: requests signed as presigned URLs
//! (SigV4, path-style, no payload checksums), sent on blocking sockets with bounded
//! timeouts, each one counted.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::RemoteError;
use super::StoreConfig;

/// How long a signed URL stays valid: longer than any one request may take.
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its entity tag, as the store gives it.
    pub etag: String,
}

/// A connection to one bucket.
#[derive(Debug)]
pub struct Client {
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    endpoint: String,
    requests: AtomicU64,
}

type Resp = ureq::http::Response<ureq::Body>;

impl Client {
    /// A client of bucket `bucket` at the endpoint of `cfg`. Makes no request.
    pub fn new(cfg: &StoreConfig, bucket: &str) -> Result<Client, RemoteError> {
        let config = |why: String| RemoteError::Config { why };
        let endpoint = url::Url::parse(&cfg.endpoint)
            .map_err(|e| config(format!("endpoint '{}': {e}", cfg.endpoint)))?;
        let b = Bucket::new(
            endpoint,
            UrlStyle::Path,
            bucket.to_string(),
            cfg.region.clone(),
        )
        .map_err(|e| {
            config(format!(
                "endpoint '{}', bucket '{bucket}': {e}",
                cfg.endpoint
            ))
        })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(cfg.connect_timeout))
            // Every wait is bounded, but not a whole body: a large stream takes as long
            // as it takes while bytes keep moving.
            .timeout_send_request(Some(cfg.io_timeout))
            .timeout_recv_response(Some(cfg.io_timeout))
            .timeout_per_read(Some(cfg.io_timeout))
            .timeout_per_write(Some(cfg.io_timeout))
            .build()
            .into();
        Ok(Client {
            bucket: b,
            creds: Credentials::new(cfg.access_key.clone(), cfg.secret_key.clone()),
            agent,
            endpoint: cfg.endpoint.clone(),
            requests: AtomicU64::new(0),
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        self.bucket.name()
    }

    /// Requests sent so far (every attempt, answered or not).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn unreachable(&self, op: &'static str, key: &str, e: ureq::Error) -> RemoteError {
        RemoteError::Unreachable {
            endpoint: self.endpoint.clone(),
            op,
            bucket: self.bucket().to_string(),
            key: key.to_string(),
            why: e.to_string(),
        }
    }

    /// The error for a response with status `status` (its body read for the
    /// store's error code, at most 64 KiB).
    fn status(&self, op: &'static str, key: &str, range: String, resp: Resp) -> RemoteError {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .with_config()
            .limit(64 << 10)
            .read_to_vec()
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let detail = text
            .split_once("<Code>")
            .and_then(|(_, r)| r.split_once("</Code>"))
            .map(|(code, _)| format!(": {code}"))
            .unwrap_or_default();
        RemoteError::Status {
            op,
            bucket: self.bucket().to_string(),
            key: key.to_string(),
            range,
            status,
            detail,
        }
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn get_resp(&self, key: &str, range: Option<(u64, u64)>) -> Result<Resp, RemoteError> {
        let url = self
            .bucket
            .get_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        let mut req = self.agent.get(url.as_str());
        let mut shown = String::new();
        if let Some((start, end)) = range {
            req = req.header("range", format!("bytes={start}-{end}"));
            shown = format!(" bytes {start}-{end}");
        }
        self.count();
        let resp = req.call().map_err(|e| self.unreachable("GET", key, e))?;
        match resp.status().as_u16() {
            200 if range.is_none() => Ok(resp),
            206 if range.is_some() => Ok(resp),
            _ => Err(self.status("GET", key, shown, resp)),
        }
    }

    /// The whole object `key`, refused if it is longer than `max` bytes.
    pub fn get(&self, key: &str, max: u64) -> Result<Vec<u8>, RemoteError> {
        let resp = self.get_resp(key, None)?;
        self.read_body(key, resp, max, None)
    }

    /// Bytes `start..=end` of object `key`.
    pub fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, RemoteError> {
        let resp = self.get_resp(key, Some((start, end)))?;
        let want = end - start + 1;
        self.read_body(key, resp, want, Some(want))
    }

    /// A reader of the whole object `key` (for a stream that is read once, in order).
    pub fn get_reader(&self, key: &str) -> Result<impl Read + 'static, RemoteError> {
        let resp = self.get_resp(key, None)?;
        Ok(resp.into_body().into_reader())
    }

    fn read_body(
        &self,
        key: &str,
        resp: Resp,
        max: u64,
        exact: Option<u64>,
    ) -> Result<Vec<u8>, RemoteError> {
        let size = |why: String| RemoteError::Size {
            bucket: self.bucket().to_string(),
            key: key.to_string(),
            why,
        };
        if let Some(len) = resp.body().content_length() {
            if len > max {
                return Err(size(format!(
                    "{len} bytes, more than the {max} it may have"
                )));
            }
        }
        let mut out = Vec::new();
        resp.into_body()
            .into_reader()
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| RemoteError::Unreachable {
                endpoint: self.endpoint.clone(),
                op: "GET",
                bucket: self.bucket().to_string(),
                key: key.to_string(),
                why: format!("reading the body: {e}"),
            })?;
        if out.len() as u64 > max {
            return Err(size(format!("more than the {max} bytes it may have")));
        }
        if let Some(n) = exact.filter(|&n| n != out.len() as u64) {
            return Err(size(format!(
                "{} bytes answered where {n} were asked",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Stores `body` as object `key`; `if_none_match` makes it fail (HTTP 412) if the
    /// key exists. Returns the new entity tag.
    pub fn put(&self, key: &str, body: &[u8], if_none_match: bool) -> Result<String, RemoteError> {
        let url = self
            .bucket
            .put_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        let mut req = self.agent.put(url.as_str());
        if if_none_match {
            req = req.header("if-none-match", "*");
        }
        self.count();
        let resp = req
            .send(body)
            .map_err(|e| self.unreachable("PUT", key, e))?;
        if !resp.status().is_success() {
            return Err(self.status("PUT", key, String::new(), resp));
        }
        Ok(etag(&resp))
    }

    /// Stores the `len` bytes `body` yields as object `key`: one PUT when they fit in
    /// `part` bytes, else a multipart upload of `part`-byte parts (at least 5 MiB,
    /// at most 10,000 of them), aborted if a part fails. Holds one part in memory.
    pub fn put_reader(
        &self,
        key: &str,
        body: &mut dyn Read,
        len: u64,
        part: u64,
    ) -> Result<(), RemoteError> {
        let read_err = |e: std::io::Error| RemoteError::Size {
            bucket: self.bucket().to_string(),
            key: key.to_string(),
            why: format!("reading what to upload: {e}"),
        };
        let part = part.max(5 << 20);
        if len <= part {
            let mut buf = Vec::with_capacity(len as usize);
            body.take(len).read_to_end(&mut buf).map_err(read_err)?;
            self.put(key, &buf, false)?;
            return Ok(());
        }
        if len.div_ceil(part) > 10_000 {
            return Err(RemoteError::Size {
                bucket: self.bucket().to_string(),
                key: key.to_string(),
                why: format!("{len} bytes need more than 10,000 parts of {part} bytes"),
            });
        }
        let upload = self.create_multipart(key)?;
        let result = (|| {
            let mut etags = Vec::new();
            let mut left = len;
            let mut buf = Vec::new();
            while left > 0 {
                let n = left.min(part);
                buf.clear();
                body.take(n).read_to_end(&mut buf).map_err(read_err)?;
                if buf.len() as u64 != n {
                    return Err(read_err(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let number = etags.len() as u16 + 1;
                let url = self
                    .bucket
                    .upload_part(Some(&self.creds), key, number, &upload)
                    .sign(SIGNED_FOR);
                self.count();
                let resp = self
                    .agent
                    .put(url.as_str())
                    .send(&buf[..])
                    .map_err(|e| self.unreachable("PUT part", key, e))?;
                if !resp.status().is_success() {
                    return Err(self.status("PUT part", key, String::new(), resp));
                }
                etags.push(etag(&resp));
                left -= n;
            }
            let xml = self.bucket.complete_multipart_upload(
                Some(&self.creds),
                key,
                &upload,
                etags.iter().map(String::as_str),
            );
            let url = xml.sign(SIGNED_FOR);
            let body = xml.body();
            self.count();
            let resp = self
                .agent
                .post(url.as_str())
                .send(body.as_bytes())
                .map_err(|e| self.unreachable("COMPLETE upload", key, e))?;
            if !resp.status().is_success() {
                return Err(self.status("COMPLETE upload", key, String::new(), resp));
            }
            // An error can come with status 200 once the parts are being joined.
            let text = resp
                .into_body()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .unwrap_or_default();
            if String::from_utf8_lossy(&text).contains("<Error>") {
                return Err(RemoteError::Status {
                    op: "COMPLETE upload",
                    bucket: self.bucket().to_string(),
                    key: key.to_string(),
                    range: String::new(),
                    status: 200,
                    detail: ": an error while joining the parts".into(),
                });
            }
            Ok(())
        })();
        if result.is_err() {
            let url = self
                .bucket
                .abort_multipart_upload(Some(&self.creds), key, &upload)
                .sign(SIGNED_FOR);
            self.count();
            let _ = self.agent.delete(url.as_str()).call();
        }
        result
    }

    fn create_multipart(&self, key: &str) -> Result<String, RemoteError> {
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        self.count();
        let resp = self
            .agent
            .post(url.as_str())
            .send_empty()
            .map_err(|e| self.unreachable("CREATE upload", key, e))?;
        if !resp.status().is_success() {
            return Err(self.status("CREATE upload", key, String::new(), resp));
        }
        let body = self.read_body(key, resp, 1 << 20, None)?;
        let parsed =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&body).map_err(|e| {
                RemoteError::Size {
                    bucket: self.bucket().to_string(),
                    key: key.to_string(),
                    why: format!("answer to CREATE upload does not parse: {e}"),
                }
            })?;
        Ok(parsed.upload_id().to_string())
    }

    /// Size and entity tag of object `key`, `None` if there is none.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        let url = self
            .bucket
            .head_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        self.count();
        let resp = self
            .agent
            .head(url.as_str())
            .call()
            .map_err(|e| self.unreachable("HEAD", key, e))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => {
                let size = resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Ok(Some(ObjectInfo {
                    key: key.to_string(),
                    size,
                    etag: etag(&resp),
                }))
            }
            _ => Err(self.status("HEAD", key, String::new(), resp)),
        }
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, RemoteError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // A listing pages 1000 keys at a time; a million keys is far past any prefix
        // this tier writes.
        for _ in 0..1000 {
            let mut action = self.bucket.list_objects_v2(Some(&self.creds));
            action.with_prefix(prefix);
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGNED_FOR);
            self.count();
            let resp = self
                .agent
                .get(url.as_str())
                .call()
                .map_err(|e| self.unreachable("LIST", prefix, e))?;
            if resp.status().as_u16() != 200 {
                return Err(self.status("LIST", prefix, String::new(), resp));
            }
            let body = self.read_body(prefix, resp, 64 << 20, None)?;
            let parsed = rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(|e| {
                RemoteError::Size {
                    bucket: self.bucket().to_string(),
                    key: prefix.to_string(),
                    why: format!("listing does not parse: {e}"),
                }
            })?;
            out.extend(parsed.contents.into_iter().map(|c| ObjectInfo {
                key: c.key,
                size: c.size,
                etag: c.etag.trim_matches('"').to_string(),
            }));
            match parsed.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    /// Creates the bucket (an existing one of ours is fine).
    pub fn create_bucket(&self) -> Result<(), RemoteError> {
        let url = self.bucket.create_bucket(&self.creds).sign(SIGNED_FOR);
        self.count();
        let resp = self
            .agent
            .put(url.as_str())
            .send_empty()
            .map_err(|e| self.unreachable("CREATE BUCKET", "", e))?;
        if resp.status().is_success() || resp.status().as_u16() == 409 {
            return Ok(());
        }
        Err(self.status("CREATE BUCKET", "", String::new(), resp))
    }
}

fn etag(resp: &Resp) -> String {
    resp.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_matches('"')
        .to_string()
}
