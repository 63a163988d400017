//! The witness (tie-breaker) server for colo-failover.
//!
//! ```text
//! cargo run -p colo-failover --example witness -- --listen 127.0.0.1:7700 [--state /var/lib/colo/witness.term]
//!     [--max-ttl-ms 30000] [--fresh]
//! ```
//!
//! Run it on a third machine that both nodes of a pair can reach. With `--state` the term (the fencing token)
//! survives restarts; after a restart it grants nothing for one maximum TTL. `--fresh` skips that wait (only for
//! a first start or tests).

use std::time::Duration;

use colo_failover::witness::{WitnessConfig, WitnessServer};

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:7700".to_owned();
    let mut config = WitnessConfig::default();
    let mut fresh = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs an address"))?
            }
            "--state" => {
                config.state_file = Some(
                    args.next()
                        .ok_or_else(|| anyhow::anyhow!("--state needs a path"))?
                        .into(),
                )
            }
            "--max-ttl-ms" => {
                let ms: u64 = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--max-ttl-ms needs a number"))?
                    .parse()?;
                anyhow::ensure!(ms > 0, "--max-ttl-ms must be positive");
                config.max_ttl = Duration::from_millis(ms);
            }
            "--fresh" => fresh = true,
            "-h" | "--help" => {
                println!("witness --listen ADDR [--state FILE] [--max-ttl-ms N] [--fresh]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let server = if fresh {
        WitnessServer::bind_fresh(&listen, config)?
    } else {
        WitnessServer::bind(&listen, config)?
    };
    println!("witness listening on {}", server.local_addr()?);
    server.run()?;
    Ok(())
}
