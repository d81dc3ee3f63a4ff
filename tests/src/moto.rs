//! A moto server (the EC2 API, from PyPI: `deploy/install-deps.d/ec2.sh`) on a free loopback
//! port, killed on drop, with a VPC and one subnet per zone created through the EC2 API.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use strata_ec2::{Ec2, Ec2Config};

use crate::{free_port, ProcessGuard};

/// Credentials moto accepts (it checks none); given to controllers through the environment,
/// so they go through the standard AWS chain.
pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";
pub const REGION: &str = "us-east-1";
/// An AMI that moto ships in us-east-1.
pub const AMI: &str = "ami-12c6146b";

pub struct Moto {
    pub endpoint: String,
    /// The tests' own client (fast retries, a generous rate).
    pub ec2: Ec2,
    /// The VPC made at start, and (subnet id, zone) of its subnets.
    pub vpc: String,
    pub subnets: Vec<(String, String)>,
    _process: ProcessGuard,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto_server and creates a VPC with subnets in `zones`.
    pub async fn start(zones: &[&str]) -> anyhow::Result<Moto> {
        let mut moto = Moto::spawn(false).await?;
        let (vpc, subnets) = moto
            .ec2
            .create_vpc_with_subnets(zones)
            .await
            .context("create VPC and subnets")?;
        moto.vpc = vpc;
        moto.subnets = subnets;
        Ok(moto)
    }

    /// Starts moto_server with authentication on and no IAM user, so it refuses every
    /// request's credentials (`INITIAL_NO_AUTH_ACTION_COUNT=0`, moto's switch for checking
    /// them: https://docs.getmoto.org/en/latest/docs/iam.html). No VPC.
    pub async fn start_rejecting_credentials() -> anyhow::Result<Moto> {
        Moto::spawn(true).await
    }

    async fn spawn(check_credentials: bool) -> anyhow::Result<Moto> {
        let port = free_port();
        let dir = tempfile::tempdir().context("create moto dir")?;
        let log = std::fs::File::create(dir.path().join("moto.log")).context("create moto log")?;
        let log_err = log.try_clone().context("clone moto log")?;
        let mut command = Command::new("moto_server");
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if check_credentials {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let process = ProcessGuard::spawn(&mut command)
            .context("start moto_server (install it with deploy/install-deps.d/ec2.sh)")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let ec2 = Ec2::connect(&client_config(&endpoint)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match ec2.describe_all().await {
                Ok(_) => break,
                // It answers: refusing the credentials is what it was started to do.
                Err(strata_ec2::Ec2Error::Rejected { .. }) if check_credentials => break,
                Err(error) if Instant::now() > deadline => {
                    bail!("moto_server did not answer on {endpoint}: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(Moto {
            endpoint,
            ec2,
            vpc: String::new(),
            subnets: Vec::new(),
            _process: process,
            _dir: dir,
        })
    }

    /// How often EC2 ever ran each `strata:instance` uuid of `cluster`, terminated instances
    /// included: a count above 1 is a duplicate launch.
    pub async fn launches_per_uuid(
        &self,
        cluster: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
        let mut launches = std::collections::BTreeMap::new();
        for instance in self.ec2.describe_all().await? {
            if instance.tag(strata_ec2::TAG_CLUSTER) == Some(cluster) {
                *launches
                    .entry(
                        instance
                            .tag(strata_ec2::TAG_INSTANCE)
                            .unwrap_or_default()
                            .to_string(),
                    )
                    .or_insert(0) += 1;
            }
        }
        Ok(launches)
    }

    /// An HTTP target group (target type `instance`) on `port` in the VPC; returns its ARN.
    pub async fn target_group(&self, name: &str, port: u16) -> anyhow::Result<String> {
        self.ec2
            .create_target_group(name, &self.vpc, port)
            .await
            .context("create target group")
    }

    /// The ids of the targets registered (not draining) in the group `arn`, sorted.
    pub async fn registered_targets(&self, arn: &str) -> anyhow::Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .ec2
            .describe_targets(arn)
            .await?
            .into_iter()
            .filter(|target| target.state.is_registered())
            .map(|target| target.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn subnet_ids(&self) -> Vec<String> {
        self.subnets.iter().map(|(id, _)| id.clone()).collect()
    }

    /// The controller flags and environment that point a controller at this server.
    pub fn controller_args(&self) -> Vec<String> {
        vec![
            "--ec2-endpoint".to_string(),
            self.endpoint.clone(),
            "--aws-region".to_string(),
            REGION.to_string(),
        ]
    }

    pub fn controller_env() -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".to_string(), ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET_KEY.to_string()),
            // No profile file or instance metadata to look for on a test machine.
            ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
        ]
    }
}

/// A client of `endpoint` with moto's credentials.
pub fn client_config(endpoint: &str) -> Ec2Config {
    Ec2Config {
        endpoint: Some(endpoint.to_string()),
        region: REGION.to_string(),
        calls_per_second: 200.0,
        burst: 50,
        static_credentials: Some((ACCESS_KEY.to_string(), SECRET_KEY.to_string())),
        ..Ec2Config::default()
    }
}
