//! A minimal HTTP/1.1 client for loopback tests and the load generator: one request per
//! connection (`Connection: close`), chunked or sized bodies, server-sent events as they arrive.
//! Not a general client: no TLS, no redirects, no proxies.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends one request; `on_body` sees body bytes as they arrive (de-chunked).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    mut on_body: impl FnMut(&[u8]),
) -> io::Result<(u16, Vec<(String, String)>)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = &body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    // The body is written beside the read: a server may answer (413) before reading it all.
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        if let Some(b) = body {
            wr.write_all(&b).await?;
        }
        wr.flush().await?;
        Ok::<_, io::Error>(wr)
    });
    let mut buf = Vec::with_capacity(8192);
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 8192];
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before the response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(bad("response head too large"));
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut rest = buf[header_end + 4..].to_vec();
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length: Option<usize> = get("content-length").and_then(|v| v.parse().ok());
    let mut tmp = vec![0u8; 16384];
    if chunked {
        // rest holds undecoded bytes: `size-hex\r\n data \r\n` ... `0\r\n\r\n`.
        loop {
            if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                let size_line = String::from_utf8_lossy(&rest[..i]).into_owned();
                let size_hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    break;
                }
                if rest.len() >= i + 2 + size + 2 {
                    on_body(&rest[i + 2..i + 2 + size]);
                    rest.drain(..i + 2 + size + 2);
                    continue;
                }
            }
            let n = rd.read(&mut tmp).await?;
            if n == 0 {
                return Err(bad("connection closed inside a chunked body"));
            }
            rest.extend_from_slice(&tmp[..n]);
        }
    } else {
        let mut seen = 0usize;
        if !rest.is_empty() {
            on_body(&rest);
            seen = rest.len();
        }
        while length.is_none_or(|l| seen < l) {
            let n = rd.read(&mut tmp).await?;
            if n == 0 {
                if length.is_some() {
                    return Err(bad("connection closed inside a sized body"));
                }
                break;
            }
            on_body(&tmp[..n]);
            seen += n;
        }
    }
    // A server that answered early may have closed before taking the whole body: fine.
    writer.abort();
    Ok((status, headers))
}

/// One request, the whole body collected.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> io::Result<HttpResponse> {
    let mut out = Vec::new();
    let (status, headers) = send(addr, method, path, body, |b| out.extend_from_slice(b)).await?;
    Ok(HttpResponse {
        status,
        headers,
        body: out,
    })
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> io::Result<HttpResponse> {
    request(addr, "POST", path, Some(body.to_string().into_bytes())).await
}

/// A streamed response: each `data:` payload with the time it arrived.
#[derive(Debug, Clone)]
pub struct SseResponse {
    pub status: u16,
    pub events: Vec<(Instant, String)>,
    /// The body when the answer was not a stream (an error object).
    pub raw: Vec<u8>,
}

impl SseResponse {
    /// The concatenated text of a chat (`delta.content`) or completion (`text`) stream.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for (_, e) in &self.events {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(e) {
                let c = &v["choices"][0];
                if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                    s.push_str(t);
                }
            }
        }
        s
    }

    pub fn finish_reason(&self) -> Option<String> {
        self.events.iter().find_map(|(_, e)| {
            serde_json::from_str::<serde_json::Value>(e).ok()?["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
    }
}

pub async fn post_sse(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> io::Result<SseResponse> {
    // Bytes, not text: a multi-byte character may straddle two reads.
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    let mut raw = Vec::new();
    let (status, _) = send(
        addr,
        "POST",
        path,
        Some(body.to_string().into_bytes()),
        |b| {
            raw.extend_from_slice(b);
            pending.extend_from_slice(b);
            while let Some(i) = pending.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = pending.drain(..i + 2).collect();
                for line in String::from_utf8_lossy(&ev).lines() {
                    if let Some(d) = line.strip_prefix("data: ") {
                        events.push((Instant::now(), d.to_string()));
                    }
                }
            }
        },
    )
    .await?;
    Ok(SseResponse {
        status,
        events,
        raw,
    })
}
