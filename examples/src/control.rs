//! The JSON-lines control socket: one JSON object per line in, one per line out, over a Unix stream socket.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"quit"}`,
//! `{"cmd":"migrate","addr":"127.0.0.1:7100"}`, and in a COLO pair `{"cmd":"failover"}`,
//! `{"cmd":"set_interval","ms":500}`, `{"cmd":"checkpoint"}`, `{"cmd":"protect","peer":"127.0.0.1:7300"}`. Answers: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! The server is generic: the VMM hands it a handler.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// Most connections served at once (one thread each); more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Report status.
    Status,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume,
    /// Stop the VMM.
    Quit,
    /// Live-migrate the guest to the VMM listening at `addr`.
    Migrate {
        /// `host:port` of the destination's `--incoming` listener.
        addr: String,
    },
    /// COLO: fail over now (the primary runs on alone; the secondary stops the primary and takes over).
    Failover,
    /// COLO: change the checkpoint interval (primary; a checkpoint follows at once).
    #[serde(rename = "set_interval")]
    SetInterval {
        /// The new interval in milliseconds.
        ms: u64,
    },
    /// COLO: checkpoint now (primary).
    Checkpoint,
    /// COLO: protect a primary that runs alone again, with the new secondary listening at `peer`
    /// (`colo-vmm run --role secondary --colo-listen ...`): full RAM and disk sync while the guest runs, then
    /// checkpoints.
    Protect {
        /// `host:port` of the new secondary's `--colo-listen` address.
        peer: String,
    },
}

/// Handles one request; returns the JSON answer (an object; `ok` is added if missing).
pub type Handler = Arc<dyn Fn(Request) -> serde_json::Value + Send + Sync>;

/// A control socket served on a background thread; stops when dropped.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer").field("path", &self.path).finish()
    }
}

fn answer(handler: &Handler, line: &str) -> serde_json::Value {
    match serde_json::from_str::<Request>(line) {
        Ok(req) => {
            let mut v = handler(req);
            if let Some(o) = v.as_object_mut() {
                o.entry("ok").or_insert(serde_json::Value::Bool(true));
            }
            v
        }
        Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
    }
}

fn serve_conn(stream: UnixStream, handler: &Handler) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(u64::MAX);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_REQUEST as u64 + 1).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let v = if line.len() > MAX_REQUEST && !line.ends_with('\n') {
            // Too long: answer and drop the connection (the rest of the line is garbage to us).
            let v = serde_json::json!({ "ok": false, "error": "request line too long" });
            writeln!(writer, "{v}")?;
            return Ok(());
        } else {
            answer(handler, line.trim())
        };
        writeln!(writer, "{v}")?;
    }
}

use std::io::Read as _;

impl ControlServer {
    /// Listen on `path` (a stale socket is replaced) and answer with `handler`.
    pub fn spawn(path: &Path, handler: Handler) -> io::Result<Self> {
        // Bind under a temporary name and rename into place: the path appears only once the socket
        // listens (bind() creates the file a moment before listen(); a client in between is refused).
        let _ = std::fs::remove_file(path);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let open = Arc::new(AtomicUsize::new(0));
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS => {
                            let v =
                                serde_json::json!({ "ok": false, "error": "too many control connections" });
                            let _ = s.set_nonblocking(true).and_then(|()| writeln!(s, "{v}"));
                        }
                        Ok((s, _)) => {
                            let h = handler.clone();
                            open.fetch_add(1, Ordering::SeqCst);
                            let open2 = open.clone();
                            let spawned =
                                std::thread::Builder::new()
                                    .name("control-conn".into())
                                    .spawn(move || {
                                        if let Err(e) = serve_conn(s, &h) {
                                            tracing::debug!("control connection: {e}");
                                        }
                                        open2.fetch_sub(1, Ordering::SeqCst);
                                    });
                            if spawned.is_err() {
                                open.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => {
                            tracing::error!("control socket: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Send one request to a control socket and return the answer.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> io::Result<serde_json::Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut w = stream.try_clone()?;
    writeln!(w, "{}", serde_json::to_string(req).map_err(io::Error::other)?)?;
    let mut line = String::new();
    BufReader::new(stream).take(1 << 20).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_answered_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let handler: Handler = Arc::new(|r| match r {
            Request::Status => serde_json::json!({ "state": "running" }),
            Request::Migrate { addr } => serde_json::json!({ "ok": false, "error": addr }),
            _ => serde_json::json!({}),
        });
        let _srv = ControlServer::spawn(&path, handler).unwrap();
        let t = Duration::from_secs(5);
        let v = request(&path, &Request::Status, t).unwrap();
        assert_eq!(v, serde_json::json!({ "ok": true, "state": "running" }));
        let v = request(&path, &Request::Migrate { addr: "x:1".into() }, t).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "x:1");
        // Garbage and over-long lines get an error answer, not a crash.
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        writeln!(w, "{{\"cmd\":\"frobnicate\"}}").unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
        writeln!(w, "{}", "x".repeat(MAX_REQUEST * 2)).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("too long"), "{line}");
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"cmd":"pause"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"set_interval","ms":250}"#).unwrap(),
            Request::SetInterval { ms: 250 }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"failover"}"#).unwrap(),
            Request::Failover
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"protect","peer":"127.0.0.1:7300"}"#).unwrap(),
            Request::Protect {
                peer: "127.0.0.1:7300".into()
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"protect"}"#).is_err(),
            "a peer is required"
        );
    }

    #[test]
    fn idle_connections_are_bounded_and_the_socket_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let handler: Handler = Arc::new(|_| serde_json::json!({}));
        let _srv = ControlServer::spawn(&path, handler).unwrap();
        let t = Duration::from_secs(5);
        // Connections that never send anything each hold a serving thread.
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let s = UnixStream::connect(&path).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let v = request(&path, &Request::Status, t).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains("too many"), "{v}");
        drop(idle);
        // Once they close, requests are served again.
        let t0 = std::time::Instant::now();
        while request(&path, &Request::Status, t).unwrap()["ok"] != true {
            assert!(t0.elapsed() < t, "connections freed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
