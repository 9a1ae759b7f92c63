//! A minimal HTTP/1.1 keep-alive client over a tokio `TcpStream`.
//!
//! The load generator shares the machine's two cores with the broker, so it must cost as little
//! as possible: no connection pool, no header map, no body stream. It writes one request, reads
//! one response (`Content-Length` or `chunked`), and keeps the connection for the next one.

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::with_capacity(16 * 1024) })
    }

    /// Sends one pre-built request (see [`request`]) and reads its response.
    pub async fn send(&mut self, request: &[u8]) -> std::io::Result<Response> {
        self.stream.write_all(request).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<Response> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("response head is not text"))?;
        let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status code"))?;
        let mut length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else { continue };
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
        self.buf.drain(..head_end);
        let body = if chunked { self.read_chunked().await? } else { self.read_exact_body(length.unwrap_or(0)).await? };
        Ok(Response { status, body })
    }

    async fn read_exact_body(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < len {
            self.fill().await?;
        }
        Ok(self.buf.drain(..len).collect())
    }

    async fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = find(&self.buf, b"\r\n") {
                    break at;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[..line_end]).map_err(|_| bad("chunk size"))?;
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed by the server"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// One HTTP/1.1 request as bytes: method, path, extra header lines (`Name: value`), body.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(what: &str) -> Error {
    Error::new(ErrorKind::InvalidData, format!("malformed HTTP response: {what}"))
}

/// One unlabelled sample of the broker's `/metrics` (0 where it cannot be read).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut conn) = Conn::open(addr).await else { return 0.0 };
    let Ok(reply) = conn.send(&request("GET", "/metrics", &[], "", b"")).await else { return 0.0 };
    sample(&reply.text(), name)
}

/// One unlabelled sample in a `/metrics` text (0 where it is missing).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
