//! What differs between the two systems under test: how a write looks on the wire and how a
//! member reports its Raft state. Everything else (client count, key space, payload, timing)
//! is shared so that both are measured the same way.
//!
//! Both systems get the same bytes: the Strata write is `PUT /v1/tiers/{name}` with a small
//! valid tier, and the etcd write stores that same tier document as the value under a key of
//! the same shape, so request size and key space match.

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;

/// Each client cycles over this many keys (so 64 clients touch 512 keys).
pub const KEYS_PER_CLIENT: u64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// strata-controller, writes through its REST API.
    Strata,
    /// etcd 3.4, writes through its v3 JSON gateway.
    Etcd,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Strata => "strata",
            System::Etcd => "etcd",
        }
    }

    /// Asks one member for its view of the group.
    pub async fn probe(self, http: &reqwest::Client, endpoint: &str) -> Result<Probe> {
        match self {
            System::Strata => probe_strata(http, endpoint).await,
            System::Etcd => probe_etcd(http, endpoint).await,
        }
    }
}

/// One member's view of its Raft group.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The id this member reports for itself: the node id (Strata) or the member id (etcd).
    pub self_id: u64,
    /// The leader it follows, in the same id space as `self_id`.
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
}

/// Builds and sends the benchmark's writes for one system.
#[derive(Clone, Debug)]
pub struct Writer {
    system: System,
    /// Strata's bearer token; etcd runs without authentication.
    token: Option<String>,
    /// Every client writes one object: Strata scales tier `bench-hot`
    /// (`POST /v1/tiers/bench-hot/scale`), etcd puts key `bench/hot`.
    hot: bool,
}

/// The tier every hot-object write scales.
const HOT_TIER: &str = "bench-hot";

impl Writer {
    pub fn new(system: System, token: Option<String>) -> Writer {
        Writer {
            system,
            token,
            hot: false,
        }
    }

    /// A writer whose clients all write the same object.
    pub fn hot(system: System, token: Option<String>) -> Writer {
        Writer {
            hot: true,
            ..Writer::new(system, token)
        }
    }

    /// Creates what the writes need before they start: the hot tier on Strata.
    pub async fn prepare(
        &self,
        transport: &strata_api::tls::Transport,
        endpoint: &str,
    ) -> Result<()> {
        if !self.hot || self.system != System::Strata {
            return Ok(());
        }
        let body = format!(
            r#"{{"name":"{HOT_TIER}","template":{{"driver":"process","command":["strata-workload"]}},"scaling":{{"min":0,"max":1000,"desired":0}}}}"#
        );
        let http = transport
            .apply(reqwest::Client::builder())
            .build()
            .context("build HTTP client")?;
        let mut request = http
            .put(format!("{endpoint}/v1/tiers/{HOT_TIER}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "create {HOT_TIER}: HTTP {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    pub fn system(&self) -> System {
        self.system
    }

    /// Write number `seq` of client `client`: key `seq % KEYS_PER_CLIENT` of that client.
    /// Success means the system acknowledged a durable, replicated write.
    pub async fn write(
        &self,
        http: &reqwest::Client,
        endpoint: &str,
        client: usize,
        seq: u64,
    ) -> Result<()> {
        let slot = seq % KEYS_PER_CLIENT;
        let tier = tier_document(client, slot);
        let response = match self.system {
            // Every write sets desired to 0 (each is still a replicated write with its own
            // version and event), so no planner has work to do: the figure is the write
            // path's, as etcd's is.
            System::Strata if self.hot => {
                let body = r#"{"desired":0}"#;
                let mut request = http
                    .post(format!("{endpoint}/v1/tiers/{HOT_TIER}/scale"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                request.send().await?
            }
            System::Etcd if self.hot => {
                let body = serde_json::json!({
                    "key": BASE64.encode("bench/hot"),
                    "value": BASE64.encode(tier),
                });
                http.post(format!("{endpoint}/v3/kv/put"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await?
            }
            System::Strata => {
                let mut request = http
                    .put(format!("{endpoint}/v1/tiers/bench-c{client}-{slot}"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(tier);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                request.send().await?
            }
            System::Etcd => {
                let body = serde_json::json!({
                    "key": BASE64.encode(format!("bench/c{client}/{slot}")),
                    "value": BASE64.encode(tier),
                });
                http.post(format!("{endpoint}/v3/kv/put"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await?
            }
        };
        let status = response.status();
        // Read the body either way: it keeps the connection reusable and explains failures.
        let body = response.bytes().await?;
        match (self.system, status.as_u16()) {
            (System::Strata, 200 | 201) | (System::Etcd, 200) => Ok(()),
            (_, code) => {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.chars().take(200).collect();
                bail!("HTTP {code}: {text}")
            }
        }
    }
}

/// The tier every write carries (112 bytes at most); the etcd value is the same document.
fn tier_document(client: usize, slot: u64) -> String {
    format!(
        r#"{{"name":"bench-c{client}-{slot}","template":{{"driver":"process","command":["strata-workload"]}},"scaling":{{"min":1,"max":3}}}}"#
    )
}

async fn probe_strata(http: &reqwest::Client, endpoint: &str) -> Result<Probe> {
    let response = http
        .get(format!("{endpoint}/v1/cluster"))
        .bearer_auth(crate::cluster::STRATA_ADMIN_TOKEN)
        .send()
        .await
        .context("GET /v1/cluster")?;
    let status = response.status();
    if !status.is_success() {
        bail!("GET /v1/cluster: HTTP {status}");
    }
    let cluster: strata_api::ClusterStatus = response.json().await.context("parse /v1/cluster")?;
    Ok(Probe {
        self_id: cluster.node_id,
        leader: cluster.leader_id,
        is_leader: cluster.role == "leader",
        commit_index: cluster.commit_index,
        applied_index: cluster.applied_index,
    })
}

/// The parts of etcd's `StatusResponse` the benchmark reads. The gateway renders 64-bit
/// integers as JSON strings, and leaves out fields that are zero.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EtcdStatus {
    header: EtcdHeader,
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    raft_index: Option<String>,
    #[serde(default)]
    raft_applied_index: Option<String>,
}

#[derive(Deserialize)]
struct EtcdHeader {
    member_id: String,
}

async fn probe_etcd(http: &reqwest::Client, endpoint: &str) -> Result<Probe> {
    let response = http
        .post(format!("{endpoint}/v3/maintenance/status"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .context("POST /v3/maintenance/status")?;
    let status = response.status();
    if !status.is_success() {
        bail!("POST /v3/maintenance/status: HTTP {status}");
    }
    let body: EtcdStatus = response.json().await.context("parse etcd status")?;
    let number = |field: Option<&String>| -> Result<u64> {
        field.map_or(Ok(0), |text| {
            text.parse().with_context(|| format!("bad number {text:?}"))
        })
    };
    let self_id = number(Some(&body.header.member_id))?;
    let leader = number(body.leader.as_ref())?;
    Ok(Probe {
        self_id,
        leader: (leader != 0).then_some(leader),
        is_leader: leader == self_id,
        commit_index: number(body.raft_index.as_ref())?,
        applied_index: number(body.raft_applied_index.as_ref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_document_is_a_valid_tier_spec() {
        let text = tier_document(63, 7);
        let spec: strata_api::TierSpec = serde_json::from_str(&text).expect("parse tier");
        assert_eq!(spec.name, "bench-c63-7");
        assert_eq!(strata_api::validate::put_tier("bench-c63-7", &spec), Ok(()));
        assert!(
            text.len() < 200,
            "payload stays small: {} bytes",
            text.len()
        );
    }
}
