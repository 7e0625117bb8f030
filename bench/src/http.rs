//! A minimal HTTP/1.1 client over one keep-alive connection: the load generator's own, so that the
//! client costs as little CPU as possible on a machine it shares with the services (like `wrk`).
//! It writes a prebuilt request and reads the status, two headers and the body (`Content-Length`
//! or chunked). No pipelining: one request in flight per connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What the load generator needs from a response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// `Idempotent-Replayed: true` was present.
    pub replayed: bool,
    pub body: Vec<u8>,
}

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server asked to close the connection after this response.
    closed: bool,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Builds a request; `headers` are extra `name: value` pairs.
pub fn request(method: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    write_request(&mut out, method, addr, path, headers, body);
    out
}

/// Like [`request`], into a reused buffer.
pub fn write_request(
    out: &mut Vec<u8>,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) {
    use std::io::Write;
    out.clear();
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if let Some(b) = body {
        let _ = write!(
            out,
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            b.len()
        );
        out.extend_from_slice(b);
    } else {
        out.extend_from_slice(b"\r\n");
    }
}

/// Incremental decoder of a chunked body: feed it the buffer, it moves decoded bytes out.
#[derive(Default)]
pub struct Chunked {
    /// Bytes left in the current chunk (data plus its trailing CRLF), if inside one.
    remaining: usize,
    pub done: bool,
}

impl Chunked {
    /// Consumes what it can from the front of `buf`, appending decoded data to `out`.
    pub fn feed(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> io::Result<()> {
        let mut pos = 0;
        loop {
            if self.done {
                break;
            }
            if self.remaining > 0 {
                let avail = (buf.len() - pos).min(self.remaining);
                // The last two bytes of a chunk are its CRLF, not data.
                let data_left = self.remaining.saturating_sub(2);
                let take = avail.min(data_left);
                out.extend_from_slice(&buf[pos..pos + take]);
                pos += avail;
                self.remaining -= avail;
                if self.remaining > 0 {
                    break;
                }
                continue;
            }
            let Some(eol) = find(&buf[pos..], b"\r\n") else { break };
            let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| bad("chunk size"))?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad("chunk size"))?;
            if size == 0 {
                // Last chunk: expect the empty trailer line.
                if buf.len() < pos + eol + 4 {
                    break;
                }
                pos += eol + 4;
                self.done = true;
                break;
            }
            pos += eol + 2;
            self.remaining = size + 2;
        }
        buf.drain(..pos);
        Ok(())
    }
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        Self::connect_from(addr, None).await
    }

    /// Like [`Self::connect`], from the local address `source` (port chosen by the kernel) if
    /// given: more connections to one server than one source address has ephemeral ports.
    pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<Self> {
        let connect = async {
            match source {
                None => TcpStream::connect(addr).await,
                Some(ip) => {
                    let socket = if ip.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(addr).await
                }
            }
        };
        let stream = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
            closed: false,
        })
    }

    /// Whether the server closed (or asked to close) the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            self.closed = true;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(())
    }

    /// Reads a response head; returns (status, replayed, content-length or None for chunked).
    async fn read_head(&mut self) -> io::Result<(u16, bool, Option<usize>)> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(bad("response head too large"));
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("response head"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let (mut replayed, mut length, mut chunked) = (false, None, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| bad("content-length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("idempotent-replayed") {
                replayed = value == "true";
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                self.closed = true;
            }
        }
        self.buf.drain(..end + 4);
        match (chunked, length) {
            (true, _) => Ok((status, replayed, None)),
            (false, Some(n)) => Ok((status, replayed, Some(n))),
            (false, None) => Err(bad("response without length")),
        }
    }

    /// Sends a prebuilt request and reads the whole response.
    pub async fn send(&mut self, req: &[u8]) -> io::Result<Response> {
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "connection closed"));
        }
        self.stream.write_all(req).await?;
        let (status, replayed, length) = self.read_head().await?;
        let mut body = Vec::new();
        match length {
            Some(n) => {
                while self.buf.len() < n {
                    self.fill().await?;
                }
                body.extend(self.buf.drain(..n));
            }
            None => {
                let mut dec = Chunked::default();
                loop {
                    dec.feed(&mut self.buf, &mut body)?;
                    if dec.done {
                        break;
                    }
                    self.fill().await?;
                }
            }
        }
        Ok(Response { status, replayed, body })
    }

    /// Sends a request whose answer is a stream (Server-Sent Events); returns the status and
    /// hands the connection over to [`EventStream`].
    pub async fn open_stream(mut self, req: &[u8]) -> io::Result<(u16, EventStream)> {
        self.stream.write_all(req).await?;
        let (status, _, length) = self.read_head().await?;
        Ok((
            status,
            EventStream {
                conn: self,
                chunked: length.is_none().then(Chunked::default),
                decoded: Vec::new(),
            },
        ))
    }
}

/// The body of a streamed response, read line by line.
pub struct EventStream {
    conn: Conn,
    chunked: Option<Chunked>,
    decoded: Vec<u8>,
}

impl EventStream {
    /// The next complete line of the body (without its newline); `None` at the end of the body.
    pub async fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.decoded.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.decoded.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            match &mut self.chunked {
                Some(dec) => {
                    dec.feed(&mut self.conn.buf, &mut self.decoded)?;
                    if dec.done {
                        return Ok(None);
                    }
                }
                None => self.decoded.append(&mut self.conn.buf),
            }
            if self.decoded.contains(&b'\n') {
                continue;
            }
            match self.conn.fill().await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoding_across_reads() {
        let whole = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n".to_vec();
        for split in 0..whole.len() {
            let mut dec = Chunked::default();
            let mut out = Vec::new();
            let mut buf = whole[..split].to_vec();
            dec.feed(&mut buf, &mut out).expect("first part");
            buf.extend_from_slice(&whole[split..]);
            dec.feed(&mut buf, &mut out).expect("second part");
            assert!(dec.done, "split at {split}");
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(buf.is_empty());
        }
    }
}
