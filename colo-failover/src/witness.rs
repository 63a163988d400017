//! The witness: a tie-breaker process on a third machine that leases the "may run alone" role to one node.
//!
//! The protocol is one request line and one answer line over TCP (ASCII, at most [`MAX_LINE`] bytes each):
//!
//! | request | answers |
//! |---|---|
//! | `ACQUIRE <node> <ttl_ms>` | `GRANTED <token> <ttl_ms>`, `DENIED <holder_token>`, `NOTREADY <retry_ms>` |
//! | `RENEW <node> <token> <ttl_ms>` | `GRANTED <token> <ttl_ms>`, `DENIED <holder_token>` |
//! | `RELEASE <node> <token>` | `RELEASED` |
//! | `STATUS` | `HOLDER <node> <token> <remaining_ms>` or `HOLDER - <last_token> 0` |
//!
//! Anything else is answered with `ERROR <text>` and the connection is closed. Node names are 1 to 64 bytes
//! of `[A-Za-z0-9._-]`.
//!
//! The server keeps its term (the last token) in a state file when given one, written and synced before a
//! new token is answered, and after a restart grants nothing for one maximum TTL. Without a state file the term
//! starts from the wall clock in milliseconds, which keeps tokens growing across restarts only as long as the
//! wall clock does not go back: give production witnesses a state file.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Arbiter, ArbiterError, Decision, FenceToken, Grant, LeaseAnswer, LeaseTable};

/// The longest request or answer line, newline included.
pub const MAX_LINE: usize = 256;
/// The longest node name.
pub const MAX_NODE_NAME: usize = 64;

/// A parsed witness request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Become (or stay) the holder.
    Acquire {
        /// Who asks.
        node: String,
        /// Requested time to live.
        ttl: Duration,
    },
    /// Extend a holding.
    Renew {
        /// Who asks.
        node: String,
        /// The holding's token.
        token: FenceToken,
        /// Requested time to live.
        ttl: Duration,
    },
    /// Give a holding up.
    Release {
        /// Who asks.
        node: String,
        /// The holding's token.
        token: FenceToken,
    },
    /// Who holds it now.
    Status,
}

/// A witness request or answer line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The line is longer than [`MAX_LINE`].
    #[error("line longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// The line is not what the protocol allows.
    #[error("malformed line {line:?}: {detail}")]
    Malformed {
        /// The offending line (cut to [`MAX_LINE`]).
        line: String,
        /// What is wrong.
        detail: &'static str,
    },
}

fn malformed(line: &str, detail: &'static str) -> WireError {
    WireError::Malformed {
        line: line.chars().take(MAX_LINE).collect(),
        detail,
    }
}

fn valid_node(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_u64(line: &str, field: Option<&str>) -> Result<u64, WireError> {
    let f = field.ok_or_else(|| malformed(line, "missing number"))?;
    if f.is_empty() || f.len() > 20 || !f.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(line, "bad number"));
    }
    f.parse().map_err(|_| malformed(line, "number out of range"))
}

fn parse_ttl(line: &str, field: Option<&str>) -> Result<Duration, WireError> {
    match parse_u64(line, field)? {
        0 => Err(malformed(line, "zero ttl")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn parse_node(line: &str, field: Option<&str>) -> Result<String, WireError> {
    match field {
        Some(n) if valid_node(n) => Ok(n.to_owned()),
        _ => Err(malformed(line, "bad node name")),
    }
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, WireError> {
        if line.len() >= MAX_LINE {
            return Err(WireError::TooLong { max: MAX_LINE });
        }
        let mut f = line.split(' ');
        let req = match f.next() {
            Some("ACQUIRE") => Request::Acquire {
                node: parse_node(line, f.next())?,
                ttl: parse_ttl(line, f.next())?,
            },
            Some("RENEW") => Request::Renew {
                node: parse_node(line, f.next())?,
                token: FenceToken(parse_u64(line, f.next())?),
                ttl: parse_ttl(line, f.next())?,
            },
            Some("RELEASE") => Request::Release {
                node: parse_node(line, f.next())?,
                token: FenceToken(parse_u64(line, f.next())?),
            },
            Some("STATUS") => Request::Status,
            _ => return Err(malformed(line, "unknown request")),
        };
        if f.next().is_some() {
            return Err(malformed(line, "trailing fields"));
        }
        Ok(req)
    }

    /// The request as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Acquire { node, ttl } => format!("ACQUIRE {node} {}\n", ttl.as_millis()),
            Request::Renew { node, token, ttl } => format!("RENEW {node} {} {}\n", token.0, ttl.as_millis()),
            Request::Release { node, token } => format!("RELEASE {node} {}\n", token.0),
            Request::Status => "STATUS\n".to_owned(),
        }
    }
}

/// A parsed witness answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A lease answer.
    Lease(LeaseAnswer),
    /// The release was processed.
    Released,
    /// The current holder (`None` if nobody), the last token and the remaining time.
    Holder {
        /// The holder's name.
        node: Option<String>,
        /// Its token, or the last one handed out.
        token: FenceToken,
        /// Time left on its lease.
        remaining: Duration,
    },
    /// The witness refused the request.
    Error(String),
}

impl Answer {
    /// Parses one answer line (without its newline).
    pub fn parse(line: &str) -> Result<Answer, WireError> {
        if line.len() >= MAX_LINE {
            return Err(WireError::TooLong { max: MAX_LINE });
        }
        if let Some(text) = line.strip_prefix("ERROR ") {
            return Ok(Answer::Error(text.to_owned()));
        }
        let mut f = line.split(' ');
        let ans = match f.next() {
            Some("GRANTED") => Answer::Lease(LeaseAnswer::Granted {
                token: FenceToken(parse_u64(line, f.next())?),
                ttl: parse_ttl(line, f.next())?,
            }),
            Some("DENIED") => Answer::Lease(LeaseAnswer::Denied {
                holder: FenceToken(parse_u64(line, f.next())?),
            }),
            Some("NOTREADY") => Answer::Lease(LeaseAnswer::NotReady {
                retry_after: Duration::from_millis(parse_u64(line, f.next())?),
            }),
            Some("RELEASED") => Answer::Released,
            Some("HOLDER") => {
                let node = match f.next() {
                    Some("-") => None,
                    other => Some(parse_node(line, other)?),
                };
                Answer::Holder {
                    node,
                    token: FenceToken(parse_u64(line, f.next())?),
                    remaining: Duration::from_millis(parse_u64(line, f.next())?),
                }
            }
            _ => return Err(malformed(line, "unknown answer")),
        };
        if f.next().is_some() {
            return Err(malformed(line, "trailing fields"));
        }
        Ok(ans)
    }

    /// The answer as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Lease(LeaseAnswer::Granted { token, ttl }) => {
                format!("GRANTED {} {}\n", token.0, ttl.as_millis())
            }
            Answer::Lease(LeaseAnswer::Denied { holder }) => format!("DENIED {}\n", holder.0),
            Answer::Lease(LeaseAnswer::NotReady { retry_after }) => {
                format!("NOTREADY {}\n", retry_after.as_millis())
            }
            Answer::Released => "RELEASED\n".to_owned(),
            Answer::Holder {
                node,
                token,
                remaining,
            } => {
                format!(
                    "HOLDER {} {} {}\n",
                    node.as_deref().unwrap_or("-"),
                    token.0,
                    remaining.as_millis()
                )
            }
            Answer::Error(text) => {
                let clean: String = text
                    .chars()
                    .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
                    .take(200)
                    .collect();
                format!("ERROR {clean}\n")
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes into `acc`, which keeps a partial line across timeouts.
/// `Ok(None)` at a clean end of stream.
fn read_line<R: BufRead>(r: &mut R, acc: &mut Vec<u8>) -> io::Result<Option<Result<String, WireError>>> {
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            if acc.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "line cut short"));
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(pos) => (pos, true),
            None => (avail.len(), false),
        };
        if acc.len() + take >= MAX_LINE {
            acc.clear();
            return Ok(Some(Err(WireError::TooLong { max: MAX_LINE })));
        }
        acc.extend_from_slice(&avail[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            let line = std::mem::take(acc);
            return Ok(Some(match String::from_utf8(line) {
                Ok(s) => Ok(s),
                Err(e) => Err(malformed(&String::from_utf8_lossy(e.as_bytes()), "not UTF-8")),
            }));
        }
    }
}

/// Witness server settings.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// The longest lease the witness grants (longer requests are capped); also the wait after a restart.
    pub max_ttl: Duration,
    /// Where the term is persisted. `None`: start from the wall clock (see the module docs).
    pub state_file: Option<PathBuf>,
    /// At most this many client connections at once; more are refused.
    pub max_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
}

impl Default for WitnessConfig {
    fn default() -> Self {
        WitnessConfig {
            max_ttl: Duration::from_secs(30),
            state_file: None,
            max_connections: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

fn read_term(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a term", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_term(path: &Path, term: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{term}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename durable; not every file system allows syncing a directory.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

struct Shared {
    table: Mutex<LeaseTable>,
    state_file: Option<PathBuf>,
    stop: AtomicBool,
    connections: AtomicUsize,
    config: WitnessConfig,
}

impl Shared {
    fn serve(&self, req: Request) -> Answer {
        let now = Instant::now();
        let Ok(mut table) = self.table.lock() else {
            return Answer::Error("witness state poisoned".to_owned());
        };
        match req {
            Request::Acquire { node, ttl } => {
                let next = table.next_term(now, &node);
                if let Some(path) = self.state_file.as_deref().filter(|_| next != table.term())
                    && let Err(e) = write_term(path, next)
                {
                    return Answer::Error(format!("cannot persist term: {e}"));
                }
                Answer::Lease(table.acquire(now, &node, ttl))
            }
            Request::Renew { node, token, ttl } => Answer::Lease(table.renew(now, &node, token, ttl)),
            Request::Release { node, token } => {
                table.release(now, &node, token);
                Answer::Released
            }
            Request::Status => match table.holder(now) {
                Some((node, token, remaining)) => Answer::Holder {
                    node: Some(node.to_owned()),
                    token,
                    remaining,
                },
                None => Answer::Holder {
                    node: None,
                    token: FenceToken(table.term()),
                    remaining: Duration::ZERO,
                },
            },
        }
    }

    fn handle(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        // Wake up now and then to notice a shutdown.
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut idle_since = Instant::now();
        let mut acc = Vec::with_capacity(MAX_LINE);
        while !self.stop.load(Ordering::Relaxed) {
            let line = match read_line(&mut reader, &mut acc) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if idle_since.elapsed() > self.config.idle_timeout {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            idle_since = Instant::now();
            match line.and_then(|l| Request::parse(&l)) {
                Ok(req) => writer.write_all(self.serve(req).to_line().as_bytes())?,
                Err(e) => {
                    writer.write_all(Answer::Error(e.to_string()).to_line().as_bytes())?;
                    writer.shutdown(Shutdown::Write)?;
                    // Swallow a bounded amount of what the client still sends, so closing does not reset the
                    // connection before it has read the error.
                    let _ = io::copy(&mut reader.take(64 * 1024), &mut io::sink());
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The witness server: a lease table behind a TCP listener.
pub struct WitnessServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl WitnessServer {
    /// Binds the listener and loads (or creates) the persisted term.
    pub fn bind(addr: impl ToSocketAddrs, config: WitnessConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let now = Instant::now();
        let table = match &config.state_file {
            Some(path) => match read_term(path)? {
                // A restart: leases granted before it may still run.
                Some(term) => LeaseTable::restarted(now, term, config.max_ttl),
                None => {
                    write_term(path, 0)?;
                    LeaseTable::new(0, config.max_ttl)
                }
            },
            None => {
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                LeaseTable::restarted(now, u64::try_from(ms).unwrap_or(u64::MAX / 2), config.max_ttl)
            }
        };
        Ok(WitnessServer {
            listener,
            shared: Arc::new(Shared {
                table: Mutex::new(table),
                state_file: config.state_file.clone(),
                stop: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
                config,
            }),
        })
    }

    /// Binds a fresh witness that has never granted anything (no restart wait). For tests and first starts.
    pub fn bind_fresh(addr: impl ToSocketAddrs, config: WitnessConfig) -> io::Result<Self> {
        let server = Self::bind(addr, config)?;
        if let Ok(mut table) = server.shared.table.lock() {
            *table = LeaseTable::new(table.term(), server.shared.config.max_ttl);
        }
        Ok(server)
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections on the calling thread until [`WitnessHandle::shutdown`] (if spawned) or forever.
    pub fn run(self) -> io::Result<()> {
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        for stream in self.listener.incoming() {
            if self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(stream) = stream else { continue };
            workers.retain(|w| !w.is_finished());
            if self.shared.connections.load(Ordering::Relaxed) >= self.shared.config.max_connections {
                let mut s = stream;
                let _ = s.write_all(
                    Answer::Error("too many connections".to_owned())
                        .to_line()
                        .as_bytes(),
                );
                continue;
            }
            self.shared.connections.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            workers.push(std::thread::spawn(move || {
                let _ = shared.handle(stream);
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            }));
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    }

    /// Serves on a background thread.
    pub fn spawn(self) -> io::Result<WitnessHandle> {
        let addr = self.local_addr()?;
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::spawn(move || {
            let _ = self.run();
        });
        Ok(WitnessHandle {
            addr,
            shared,
            thread: Some(thread),
        })
    }
}

/// A witness served by a background thread; shuts it down on drop.
pub struct WitnessHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WitnessHandle {
    /// Where the witness listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current holder, its token and remaining time.
    pub fn holder(&self) -> Option<(String, FenceToken, Duration)> {
        let table = self.shared.table.lock().ok()?;
        table.holder(Instant::now()).map(|(n, t, r)| (n.to_owned(), t, r))
    }

    /// Stops accepting, closes every connection and joins the server thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The witness client: an [`Arbiter`] that asks a [`WitnessServer`] over TCP.
///
/// Keeps one connection open and reconnects after any error. Every call is bounded by `timeout` (connect,
/// write and read each).
#[derive(Debug)]
pub struct WitnessArbiter {
    addr: SocketAddr,
    node: String,
    ttl: Duration,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
    held: Option<FenceToken>,
}

impl WitnessArbiter {
    /// A client for the witness at `addr`, asking for leases of `ttl` as `node`.
    pub fn new(addr: SocketAddr, node: &str, ttl: Duration, timeout: Duration) -> Result<Self, ArbiterError> {
        if !valid_node(node) {
            return Err(ArbiterError::Protocol {
                endpoint: addr.to_string(),
                detail: format!("node name {node:?} is not 1..=64 bytes of [A-Za-z0-9._-]"),
            });
        }
        if ttl.is_zero() || timeout.is_zero() {
            return Err(ArbiterError::Protocol {
                endpoint: addr.to_string(),
                detail: "zero ttl or timeout".into(),
            });
        }
        Ok(WitnessArbiter {
            addr,
            node: node.to_owned(),
            ttl,
            timeout,
            conn: None,
            held: None,
        })
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> ArbiterError {
        ArbiterError::Io {
            endpoint: self.addr.to_string(),
            op,
            source,
        }
    }

    fn call(&mut self, req: &Request) -> Result<Answer, ArbiterError> {
        let result = self.call_once(req);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn call_once(&mut self, req: &Request) -> Result<Answer, ArbiterError> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)
                .map_err(|e| self.io_err("connect", e))?;
            s.set_nodelay(true).map_err(|e| self.io_err("configure", e))?;
            s.set_read_timeout(Some(self.timeout))
                .map_err(|e| self.io_err("configure", e))?;
            s.set_write_timeout(Some(self.timeout))
                .map_err(|e| self.io_err("configure", e))?;
            self.conn = Some(BufReader::new(s));
        }
        let line = req.to_line();
        let endpoint = self.addr.to_string();
        let conn = self.conn.as_mut().ok_or(ArbiterError::NotHeld)?;
        if let Err(e) = conn.get_mut().write_all(line.as_bytes()) {
            return Err(ArbiterError::Io {
                endpoint,
                op: "write",
                source: e,
            });
        }
        let mut acc = Vec::with_capacity(64);
        match read_line(conn, &mut acc) {
            Ok(Some(Ok(l))) => match Answer::parse(&l) {
                Ok(Answer::Error(text)) => Err(ArbiterError::Protocol {
                    endpoint,
                    detail: text,
                }),
                Ok(a) => Ok(a),
                Err(e) => Err(ArbiterError::Protocol {
                    endpoint,
                    detail: e.to_string(),
                }),
            },
            Ok(Some(Err(e))) => Err(ArbiterError::Protocol {
                endpoint,
                detail: e.to_string(),
            }),
            Ok(None) => Err(ArbiterError::Io {
                endpoint,
                op: "read",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "witness closed the connection"),
            }),
            Err(e) => Err(ArbiterError::Io {
                endpoint,
                op: "read",
                source: e,
            }),
        }
    }

    fn lease_decision(&mut self, answer: Answer) -> Result<Decision, ArbiterError> {
        match answer {
            Answer::Lease(LeaseAnswer::Granted { token, ttl }) => {
                self.held = Some(token);
                Ok(Decision::Granted(Grant {
                    token,
                    ttl: Some(ttl),
                }))
            }
            Answer::Lease(LeaseAnswer::Denied { holder }) => {
                self.held = None;
                Ok(Decision::Denied { holder: Some(holder) })
            }
            Answer::Lease(LeaseAnswer::NotReady { retry_after }) => Err(ArbiterError::NotReady {
                endpoint: self.addr.to_string(),
                retry_after,
            }),
            other => Err(ArbiterError::Protocol {
                endpoint: self.addr.to_string(),
                detail: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Asks the witness who holds the lease.
    pub fn status(&mut self) -> Result<(Option<String>, FenceToken, Duration), ArbiterError> {
        match self.call(&Request::Status)? {
            Answer::Holder {
                node,
                token,
                remaining,
            } => Ok((node, token, remaining)),
            other => Err(ArbiterError::Protocol {
                endpoint: self.addr.to_string(),
                detail: format!("unexpected answer {other:?}"),
            }),
        }
    }
}

impl Arbiter for WitnessArbiter {
    fn acquire(&mut self) -> Result<Decision, ArbiterError> {
        let answer = self.call(&Request::Acquire {
            node: self.node.clone(),
            ttl: self.ttl,
        })?;
        self.lease_decision(answer)
    }

    fn renew(&mut self) -> Result<Decision, ArbiterError> {
        let token = self.held.ok_or(ArbiterError::NotHeld)?;
        let answer = self.call(&Request::Renew {
            node: self.node.clone(),
            token,
            ttl: self.ttl,
        })?;
        self.lease_decision(answer)
    }

    fn release(&mut self) -> Result<(), ArbiterError> {
        let token = self.held.take().ok_or(ArbiterError::NotHeld)?;
        match self.call(&Request::Release {
            node: self.node.clone(),
            token,
        })? {
            Answer::Released => Ok(()),
            other => Err(ArbiterError::Protocol {
                endpoint: self.addr.to_string(),
                detail: format!("unexpected answer {other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip() {
        let reqs = [
            Request::Acquire {
                node: "node-a".into(),
                ttl: Duration::from_millis(1500),
            },
            Request::Renew {
                node: "b.1".into(),
                token: FenceToken(u64::MAX),
                ttl: Duration::from_millis(1),
            },
            Request::Release {
                node: "c_2".into(),
                token: FenceToken(0),
            },
            Request::Status,
        ];
        for r in reqs {
            let line = r.to_line();
            assert_eq!(Request::parse(line.trim_end_matches('\n')), Ok(r));
        }
        let answers = [
            Answer::Lease(LeaseAnswer::Granted {
                token: FenceToken(9),
                ttl: Duration::from_millis(2000),
            }),
            Answer::Lease(LeaseAnswer::Denied {
                holder: FenceToken(3),
            }),
            Answer::Lease(LeaseAnswer::NotReady {
                retry_after: Duration::from_millis(0),
            }),
            Answer::Released,
            Answer::Holder {
                node: Some("a".into()),
                token: FenceToken(4),
                remaining: Duration::from_millis(7),
            },
            Answer::Holder {
                node: None,
                token: FenceToken(4),
                remaining: Duration::ZERO,
            },
            Answer::Error("bad thing".into()),
        ];
        for a in answers {
            let line = a.to_line();
            assert_eq!(Answer::parse(line.trim_end_matches('\n')), Ok(a));
        }
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        for bad in [
            "",
            "ACQUIRE",
            "ACQUIRE a",
            "ACQUIRE a 0",
            "ACQUIRE a -5",
            "ACQUIRE a 99999999999999999999999",
            "ACQUIRE a 10 extra",
            "ACQUIRE a\u{e9} 10",
            "ACQUIRE a/b 10",
            "RENEW a x 10",
            "RELEASE a",
            "acquire a 10",
        ] {
            assert!(
                matches!(Request::parse(bad), Err(WireError::Malformed { .. })),
                "{bad:?}"
            );
        }
        let long = format!("ACQUIRE {} 10", "a".repeat(300));
        assert_eq!(Request::parse(&long), Err(WireError::TooLong { max: MAX_LINE }));
        let name65 = format!("ACQUIRE {} 10", "a".repeat(65));
        assert!(Request::parse(&name65).is_err());
    }

    #[test]
    fn read_line_caps_length() {
        let mut acc = Vec::new();
        let data = vec![b'x'; 1000];
        let mut r = BufReader::new(&data[..]);
        assert!(matches!(
            read_line(&mut r, &mut acc),
            Ok(Some(Err(WireError::TooLong { .. })))
        ));
        let mut r = BufReader::new(&b"ok\nnext"[..]);
        assert_eq!(read_line(&mut r, &mut acc).ok(), Some(Some(Ok("ok".to_owned()))));
        assert!(read_line(&mut r, &mut acc).is_err(), "a cut line is an error");
    }

    /// Lines that look like the protocol (known words, names, numbers of any length) or are arbitrary.
    fn line_strategy() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "(ACQUIRE|RENEW|RELEASE|STATUS|GRANTED|DENIED|NOTREADY|RELEASED|HOLDER|ERROR)( ([a-zA-Z0-9._/-]{0,70}|[0-9]{0,24}|-|)){0,5}",
            any::<String>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever a peer sends, parsing never panics, and what parses prints back to the same value.
        #[test]
        fn any_line_parses_or_is_a_typed_error(line in line_strategy()) {
            if let Ok(r) = Request::parse(&line) {
                let again = r.to_line();
                proptest::prop_assert!(again.len() <= MAX_LINE);
                proptest::prop_assert_eq!(Request::parse(again.trim_end_matches('\n')), Ok(r));
            }
            match Answer::parse(&line) {
                Ok(Answer::Error(text)) => proptest::prop_assert!(text.len() < MAX_LINE),
                Ok(a) => {
                    let again = a.to_line();
                    proptest::prop_assert_eq!(Answer::parse(again.trim_end_matches('\n')), Ok(a));
                }
                Err(_) => {}
            }
        }

        /// Arbitrary bytes in arbitrary pieces: every line comes out whole or as a typed error, and the
        /// partial-line buffer never grows past `MAX_LINE`.
        #[test]
        fn read_line_takes_arbitrary_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            cap in 1usize..64,
        ) {
            let mut r = BufReader::with_capacity(cap, &bytes[..]);
            let mut acc = Vec::new();
            let mut lines = 0;
            loop {
                match read_line(&mut r, &mut acc) {
                    Ok(None) => break,
                    Ok(Some(Ok(line))) => {
                        proptest::prop_assert!(line.len() < MAX_LINE && !line.contains('\n'));
                        lines += 1;
                    }
                    Ok(Some(Err(_))) => lines += 1,
                    Err(_) => break,
                }
                proptest::prop_assert!(acc.len() < MAX_LINE);
                proptest::prop_assert!(lines <= bytes.len());
            }
        }
    }
}
