//! An [`Arbiter`] backed by an etcd lease (feature `etcd`).
//!
//! Winning is one transaction: if the key's `create_revision` is 0 (the key does not exist), put it with our
//! lease attached; otherwise read it. The key's `create_revision` is the fencing token: etcd's revision only
//! grows, so every new holder's key is created at a larger revision than any before it, across etcd restarts
//! and leader changes. When the holder stops renewing, etcd deletes the key with the lease and the next
//! transaction wins.
//!
//! etcd-client is asynchronous; this type owns a single-threaded tokio runtime and blocks on it, with every
//! call bounded by the configured timeout. Renewal is one keep-alive round trip per [`Arbiter::renew`]
//! (etcd-client does not renew by itself, and it must not here: a node that stopped driving its machine must
//! lose its lease).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::{Arbiter, ArbiterError, Decision, FenceToken, Grant};

/// Where and how to hold the role in etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, such as `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key both nodes of a pair compete for (one key per pair).
    pub key: String,
    /// This node's name, stored as the key's value (for operators).
    pub node: String,
    /// The lease TTL in whole seconds (etcd's unit; its minimum depends on the server's election timeout).
    pub ttl_secs: i64,
    /// Bound on each call (connect, grant, txn, keep-alive round trip, revoke).
    pub timeout: Duration,
}

struct Held {
    id: i64,
    ttl: i64,
    token: Option<FenceToken>,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// The etcd lease arbiter.
pub struct EtcdArbiter {
    rt: tokio::runtime::Runtime,
    client: Client,
    config: EtcdConfig,
    held: Option<Held>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("config", &self.config)
            .field("lease", &self.held.as_ref().map(|h| (h.id, h.token)))
            .finish()
    }
}

impl EtcdArbiter {
    /// Connects to etcd.
    pub fn connect(config: EtcdConfig) -> Result<Self, ArbiterError> {
        let endpoint = config.endpoints.join(",");
        if config.ttl_secs <= 0 || config.timeout.is_zero() || config.key.is_empty() {
            return Err(ArbiterError::Protocol {
                endpoint,
                detail: "ttl, timeout and key must be non-zero".into(),
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ArbiterError::Io {
                endpoint: endpoint.clone(),
                op: "start tokio runtime",
                source,
            })?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout);
        let client = rt
            .block_on(async {
                tokio::time::timeout(config.timeout, Client::connect(&config.endpoints, Some(options))).await
            })
            .map_err(|_| timeout_err(&endpoint, "connect"))?
            .map_err(|e| etcd_err(&endpoint, "connect", e))?;
        Ok(EtcdArbiter {
            rt,
            client,
            config,
            held: None,
        })
    }

    fn endpoint(&self) -> String {
        self.config.endpoints.join(",")
    }

    /// The key's current holder value and token, if the key exists (for tests and operators).
    pub fn holder(&mut self) -> Result<Option<(String, FenceToken)>, ArbiterError> {
        let endpoint = self.endpoint();
        let (timeout, key) = (self.config.timeout, self.config.key.clone());
        let client = &mut self.client;
        let resp = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, client.get(key, None)).await })
            .map_err(|_| timeout_err(&endpoint, "get"))?
            .map_err(|e| etcd_err(&endpoint, "get", e))?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some((
                String::from_utf8_lossy(kv.value()).into_owned(),
                token_of(&endpoint, kv.create_revision())?,
            ))),
            None => Ok(None),
        }
    }

    /// Grants a fresh lease and opens its keep-alive stream.
    fn grant(&mut self) -> Result<(), ArbiterError> {
        let endpoint = self.endpoint();
        let (timeout, ttl) = (self.config.timeout, self.config.ttl_secs);
        let client = &mut self.client;
        let held = self
            .rt
            .block_on(async {
                tokio::time::timeout(timeout, async {
                    let g = client.lease_grant(ttl, None).await?;
                    let (keeper, stream) = client.lease_keep_alive(g.id()).await?;
                    Ok::<_, etcd_client::Error>(Held {
                        id: g.id(),
                        ttl: g.ttl(),
                        token: None,
                        keeper,
                        stream,
                    })
                })
                .await
            })
            .map_err(|_| timeout_err(&endpoint, "lease grant"))?
            .map_err(|e| etcd_err(&endpoint, "lease grant", e))?;
        self.held = Some(held);
        Ok(())
    }

    /// One keep-alive round trip: `Some(ttl)` if the lease lives, `None` if etcd says it is gone.
    fn keep_alive(&mut self) -> Result<Option<i64>, ArbiterError> {
        let endpoint = self.endpoint();
        let timeout = self.config.timeout;
        let Some(held) = self.held.as_mut() else {
            return Err(ArbiterError::NotHeld);
        };
        let result = self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                held.keeper.keep_alive().await?;
                held.stream.message().await
            })
            .await
        });
        match result {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some(resp.ttl())),
            Ok(Ok(_)) => {
                // A zero TTL (or the stream ending) means the lease is gone.
                self.held = None;
                Ok(None)
            }
            Ok(Err(e)) => {
                self.reopen_stream();
                Err(etcd_err(&endpoint, "keep-alive", e))
            }
            Err(_) => {
                // A late answer must not be mistaken for the next one: start a fresh stream.
                self.reopen_stream();
                Err(timeout_err(&endpoint, "keep-alive"))
            }
        }
    }

    fn reopen_stream(&mut self) {
        let timeout = self.config.timeout;
        let Some(held) = self.held.as_mut() else { return };
        let client = &mut self.client;
        let id = held.id;
        let fresh = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, client.lease_keep_alive(id)).await });
        match fresh {
            Ok(Ok((keeper, stream))) => {
                held.keeper = keeper;
                held.stream = stream;
            }
            // No stream, no renewals: forget the lease; etcd expires it and a later acquire starts over.
            _ => self.held = None,
        }
    }

    fn try_win(&mut self) -> Result<Decision, ArbiterError> {
        let endpoint = self.endpoint();
        let Some(held) = self.held.as_ref() else {
            return Err(ArbiterError::NotHeld);
        };
        let (id, ttl) = (held.id, held.ttl);
        let key = self.config.key.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.config.node.clone(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let timeout = self.config.timeout;
        let client = &mut self.client;
        let resp = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, client.txn(txn)).await })
            .map_err(|_| timeout_err(&endpoint, "txn"))?
            .map_err(|e| etcd_err(&endpoint, "txn", e))?;
        let grant = |token| {
            Decision::Granted(Grant {
                token,
                ttl: Some(Duration::from_secs(ttl.unsigned_abs())),
            })
        };
        if resp.succeeded() {
            let rev = resp
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| ArbiterError::Protocol {
                    endpoint: endpoint.clone(),
                    detail: "txn answer without header".into(),
                })?;
            let token = token_of(&endpoint, rev)?;
            if let Some(h) = self.held.as_mut() {
                h.token = Some(token);
            }
            return Ok(grant(token));
        }
        let kv = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        match kv {
            Some(kv) if kv.lease() == id => {
                let token = token_of(&endpoint, kv.create_revision())?;
                if let Some(h) = self.held.as_mut() {
                    h.token = Some(token);
                }
                Ok(grant(token))
            }
            Some(kv) => Ok(Decision::Denied {
                holder: Some(token_of(&endpoint, kv.create_revision())?),
            }),
            // Deleted between the compare and the read cannot happen inside one txn; treat as a retryable error.
            None => Err(ArbiterError::Protocol {
                endpoint,
                detail: "key vanished inside the txn".into(),
            }),
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn acquire(&mut self) -> Result<Decision, ArbiterError> {
        // Refresh an existing lease first so its full TTL counts from (after) this request; a lease that etcd
        // already dropped is replaced by a fresh one.
        if self.held.is_some() && self.keep_alive()?.is_none() {
            self.held = None;
        }
        if self.held.is_none() {
            self.grant()?;
        }
        match self.try_win() {
            Ok(d) => Ok(d),
            // A timeout is not retried: every call stays bounded by about two timeouts.
            Err(e @ ArbiterError::Io { .. }) => Err(e),
            Err(e) => {
                // Most likely the lease expired between the keep-alive and the txn (etcd answers NotFound):
                // start over with a fresh lease once.
                self.held = None;
                self.grant()?;
                self.try_win().map_err(|_| e)
            }
        }
    }

    fn renew(&mut self) -> Result<Decision, ArbiterError> {
        let token = self
            .held
            .as_ref()
            .and_then(|h| h.token)
            .ok_or(ArbiterError::NotHeld)?;
        match self.keep_alive()? {
            Some(ttl) => Ok(Decision::Granted(Grant {
                token,
                ttl: Some(Duration::from_secs(ttl.unsigned_abs())),
            })),
            None => Ok(Decision::Denied { holder: None }),
        }
    }

    fn release(&mut self) -> Result<(), ArbiterError> {
        let held = self.held.take().ok_or(ArbiterError::NotHeld)?;
        let endpoint = self.endpoint();
        let timeout = self.config.timeout;
        let client = &mut self.client;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, client.lease_revoke(held.id)).await })
            .map_err(|_| timeout_err(&endpoint, "lease revoke"))?
            .map_err(|e| etcd_err(&endpoint, "lease revoke", e))?;
        Ok(())
    }
}

impl EtcdArbiter {
    /// Stops renewing without telling etcd (what a crashed or frozen holder looks like): the lease runs out
    /// on etcd's clock. For tests and drills.
    pub fn abandon(&mut self) {
        self.held = None;
    }
}

fn token_of(endpoint: &str, revision: i64) -> Result<FenceToken, ArbiterError> {
    u64::try_from(revision)
        .map(FenceToken)
        .map_err(|_| ArbiterError::Protocol {
            endpoint: endpoint.to_owned(),
            detail: format!("negative revision {revision}"),
        })
}

fn etcd_err(endpoint: &str, op: &'static str, e: etcd_client::Error) -> ArbiterError {
    ArbiterError::Etcd {
        endpoint: endpoint.to_owned(),
        op,
        detail: e.to_string(),
    }
}

fn timeout_err(endpoint: &str, op: &'static str) -> ArbiterError {
    ArbiterError::Io {
        endpoint: endpoint.to_owned(),
        op,
        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within the timeout"),
    }
}
