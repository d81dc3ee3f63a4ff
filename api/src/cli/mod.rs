//! `stratactl`: the operator's command line, in the manner of kubectl.
//!
//! Commands are grouped by verb, then resource (`get tier web`, `scale tier web 3`),
//! so adding a resource (`get nodes`, `get instances --tier web`) or a verb (`cordon NODE`) is a
//! new enum variant and one match arm. `execute` takes its input and output streams as
//! arguments so tests can run whole commands against a fake controller.

mod apply;
mod render;

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::client::{Client, ClientConfig, ClientError, DEFAULT_SERVER};
use crate::cluster::AddMemberRequest;
use crate::decode::DocumentsError;
use crate::duration::Duration;
use crate::list::ItemList;
use crate::node::Node;
use crate::problem::Problem;
use crate::tier::ScaleRequest;
use crate::tls::Transport;
use crate::validate;

/// Command line of `stratactl`.
#[derive(Debug, Parser)]
#[command(
    name = "stratactl",
    version,
    about = "Control a Strata cluster: declare tiers of auto-scaled VMs and manage the controllers",
    long_about = "Control a Strata cluster: declare tiers of auto-scaled VMs and manage the \
                  controllers.\n\nAny controller accepts any request: list several with --server \
                  and stratactl moves to the next one when a controller is down or has no leader."
)]
pub struct Cli {
    /// Controller API addresses (host:port, http://host:port or https://host:port),
    /// comma-separated; tried in turn until one answers. A bare host:port is https when
    /// --ca-cert is given.
    #[arg(
        long,
        global = true,
        env = "STRATA_SERVER",
        value_delimiter = ',',
        default_value = DEFAULT_SERVER,
        value_name = "ADDRESSES"
    )]
    pub server: Vec<String>,

    /// Bearer token sent with every request. Prefer --token-file: a flag shows in `ps`.
    #[arg(long, global = true, env = "STRATA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file holding the bearer token (its first line).
    #[arg(
        long,
        global = true,
        env = "STRATA_TOKEN_FILE",
        conflicts_with = "token",
        value_name = "FILE"
    )]
    pub token_file: Option<std::path::PathBuf>,

    /// The CA that signed the controllers' certificates: talk TLS to them.
    #[arg(long, global = true, env = "STRATA_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// A client certificate (PEM), for controllers that require one (--client-ca).
    #[arg(
        long,
        global = true,
        env = "STRATA_TLS_CERT",
        requires = "tls_key",
        value_name = "FILE"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "STRATA_TLS_KEY",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// Output format: aligned tables and short messages, or the full objects as JSON or YAML.
    #[arg(short, long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Let the answering controller read from its local state instead of confirming with the
    /// leader: faster, works without a quorum, may be slightly out of date.
    #[arg(long, global = true)]
    pub stale: bool,

    /// Limit on one request to one controller (for example 500ms, 10s).
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION")]
    pub request_timeout: Duration,

    /// How long to keep trying other controllers before giving up.
    #[arg(long, global = true, default_value = "15s", value_name = "DURATION")]
    pub failover_deadline: Duration,

    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for lists; one line per change for writes.
    #[default]
    Table,
    /// The objects as the API returns them, pretty-printed.
    Json,
    /// The objects as YAML, ready to edit and apply again.
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update resources from a YAML or JSON file.
    Apply(ApplyArgs),
    /// List resources, or show one.
    Get {
        #[command(subcommand)]
        resource: GetResource,
    },
    /// Show one resource in detail: its spec and status, its instances and recent events.
    Describe {
        #[command(subcommand)]
        resource: DescribeResource,
    },
    /// Delete a resource.
    Delete {
        #[command(subcommand)]
        resource: DeleteResource,
    },
    /// Set the instance count of a resource by hand.
    Scale {
        #[command(subcommand)]
        resource: ScaleResource,
    },
    /// Inspect and change the controller cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Stop placing new instances on a node; the ones it runs stay.
    Cordon {
        /// The node's id (the agent's --node-id).
        node: String,
    },
    /// Let a cordoned node take new instances again.
    Uncordon {
        /// The node's id (the agent's --node-id).
        node: String,
    },
    /// Move a node's instances elsewhere; returns once the controller has recorded the drain,
    /// not when the instances have moved.
    Drain {
        /// The node's id (the agent's --node-id).
        node: String,
    },
    /// Revoke a credential: the node's agent can no longer authenticate with it and must
    /// register again with the join token (rotate the join token too if it may have leaked).
    Revoke {
        #[command(subcommand)]
        resource: RevokeResource,
    },
}

#[derive(Debug, Subcommand)]
pub enum RevokeResource {
    /// A node's credential.
    Node {
        /// The node's id (the agent's --node-id).
        node: String,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// File holding one or more tiers: YAML documents separated by `---`, a JSON object or a
    /// JSON array; `-` reads standard input. Every document is checked before any is sent.
    #[arg(short, long, value_name = "FILE")]
    pub filename: String,
}

#[derive(Debug, Subcommand)]
pub enum GetResource {
    /// List tiers, or show the named one.
    #[command(visible_alias = "tiers")]
    Tier {
        /// The tier to show; all tiers when absent.
        name: Option<String>,
    },
    /// List nodes (agent hosts), or show the named one.
    #[command(visible_alias = "nodes")]
    Node {
        /// The node to show; all nodes when absent.
        id: Option<String>,
    },
    /// List instances, of every tier or of one.
    #[command(visible_alias = "instances")]
    Instance {
        /// Only the instances of this tier.
        #[arg(long, value_name = "TIER")]
        tier: Option<String>,
    },
    /// Show the load-balancer pool of a tier: its servers and what each LB node serves.
    Pool {
        /// The tier.
        tier: String,
    },
    /// Print the addresses of the load balancers serving a tier, one per line (for DNS
    /// round robin: one `A` record each).
    #[command(visible_alias = "endpoint")]
    Endpoints {
        /// The tier.
        tier: String,
    },
    /// List what the controller decided and why, oldest first.
    #[command(visible_alias = "events")]
    Event {
        /// Only the events about this object: tier/NAME, node/ID or instance/UUID.
        #[arg(long, value_name = "KIND/NAME", value_parser = parse_object)]
        object: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DescribeResource {
    /// Describe a tier, with its instances and recent events.
    Tier {
        /// The tier to describe.
        name: String,
    },
    /// Describe a node, with its instances and recent events.
    Node {
        /// The node's id.
        id: String,
    },
}

/// The kinds of object events can be about, as they are spelled in `--object`.
const EVENT_OBJECT_KINDS: [&str; 3] = ["tier", "node", "instance"];

/// Checks `--object` locally, so that a typo such as `tiers/web` is named as such instead of
/// listing no events.
fn parse_object(value: &str) -> Result<String, String> {
    match value.split_once('/') {
        Some((kind, name)) if EVENT_OBJECT_KINDS.contains(&kind) && !name.is_empty() => {
            Ok(value.to_string())
        }
        _ => Err(format!(
            "expected KIND/NAME with KIND one of {}, such as tier/web",
            EVENT_OBJECT_KINDS.join(", ")
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum DeleteResource {
    /// Delete a tier; its instances are drained and stopped.
    Tier {
        /// The tier to delete.
        name: String,
        /// Delete only if the tier still has this resource version (409 otherwise).
        #[arg(long, value_name = "VERSION")]
        resource_version: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScaleResource {
    /// Pin a tier's instance count (it must lie within the tier's scaling.min and scaling.max),
    /// which pauses the tier's autoscaler; `--auto` hands the count back to the autoscaler.
    #[command(group(clap::ArgGroup::new("count").required(true).args(["replicas", "replicas_flag", "auto"])))]
    Tier {
        /// The tier to scale.
        name: String,
        /// The number of instances to run.
        #[arg(value_name = "N")]
        replicas: Option<u32>,
        /// The number of instances to run (the same as N).
        #[arg(long = "replicas", value_name = "N")]
        replicas_flag: Option<u32>,
        /// Hand the count back to the autoscaler, which decides from the count it has now.
        #[arg(long)]
        auto: bool,
        /// Scale only if the tier still has this resource version (409 otherwise).
        #[arg(long, value_name = "VERSION")]
        resource_version: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the members, the leader, the term and the commit and applied indexes.
    Status,
    /// Add a controller to the Raft group; it catches up, then becomes a voter unless
    /// --learner is given.
    AddMember {
        /// Raft node id of the new controller (1 or more, unique in the cluster).
        #[arg(long)]
        id: u64,
        /// host:port of the new controller's API listener.
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
        /// Keep the member a learner: it replicates the log but does not vote.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a controller from the Raft group.
    RemoveMember {
        /// Raft node id of the controller to remove.
        #[arg(long)]
        id: u64,
    },
}

/// Why a command failed; printed as `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{}", describe_client_error(.0))]
    Client(#[from] ClientError),
    #[error("read {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Documents {
        path: String,
        source: DocumentsError,
    },
    #[error("{path} holds no documents")]
    NoDocuments { path: String },
    /// Local validation failed; the text lists each document and field.
    #[error("{0}")]
    Invalid(String),
    #[error("{failed} of {total} resources could not be applied")]
    ApplyFailed { failed: usize, total: usize },
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encode output: {0}")]
    Encode(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The streams a command reads and writes.
pub struct Streams<'a> {
    pub stdin: &'a mut dyn Read,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// Runs a parsed command line against the real terminal; exit code 1 on any failure
/// (usage errors never get here: clap exits with 2).
pub async fn run(cli: Cli) -> ExitCode {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let mut streams = Streams {
        stdin: &mut stdin,
        stdout: &mut stdout,
        stderr: &mut stderr,
    };
    match execute(cli, &mut streams).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Nothing more can be said to a reader that went away (`| head`).
            if !matches!(&error, CliError::Output(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                let _ = writeln!(streams.stderr, "error: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs one command, writing results to `streams.stdout` and per-item failures to
/// `streams.stderr`; the returned error is the command's overall failure.
pub async fn execute(cli: Cli, streams: &mut Streams<'_>) -> Result<(), CliError> {
    let transport = Transport::from_flags(
        cli.ca_cert.as_deref(),
        cli.tls_cert.as_deref(),
        cli.tls_key.as_deref(),
    )?;
    let client = Client::new(ClientConfig {
        servers: cli.server,
        transport,
        token: match &cli.token_file {
            Some(path) => Some(read_token_file(path)?),
            None => cli.token,
        },
        request_timeout: cli.request_timeout.as_std(),
        failover_deadline: cli.failover_deadline.as_std(),
    })?;
    let context = Context {
        client,
        output: cli.output,
        stale: cli.stale,
    };
    match cli.command {
        Command::Apply(args) => apply::run(&context, &args, streams).await,
        Command::Get { resource } => get(&context, resource, streams).await,
        Command::Describe { resource } => describe(&context, resource, streams).await,
        Command::Delete { resource } => delete(&context, resource, streams).await,
        Command::Scale { resource } => scale(&context, resource, streams).await,
        Command::Cluster { command } => cluster(&context, command, streams).await,
        Command::Cordon { node } => node_action(&context, NodeAction::Cordon, &node, streams).await,
        Command::Uncordon { node } => {
            node_action(&context, NodeAction::Uncordon, &node, streams).await
        }
        Command::Drain { node } => node_action(&context, NodeAction::Drain, &node, streams).await,
        Command::Revoke {
            resource: RevokeResource::Node { node },
        } => node_action(&context, NodeAction::Revoke, &node, streams).await,
    }
}

/// The first line of a token file.
fn read_token_file(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(CliError::Invalid(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// What every command needs besides its own arguments.
struct Context {
    client: Client,
    output: OutputFormat,
    stale: bool,
}

impl Context {
    /// Prints `object` as JSON or YAML, or `table()` for the table format.
    fn print<T: Serialize>(
        &self,
        out: &mut dyn Write,
        object: &T,
        table: impl FnOnce() -> String,
    ) -> Result<(), CliError> {
        let text = match self.output {
            OutputFormat::Table => table(),
            OutputFormat::Json => serde_json::to_string_pretty(object)
                .map(|json| json + "\n")
                .map_err(|error| CliError::Encode(error.to_string()))?,
            OutputFormat::Yaml => serde_norway::to_string(object)
                .map_err(|error| CliError::Encode(error.to_string()))?,
        };
        out.write_all(text.as_bytes())?;
        Ok(())
    }
}

async fn get(
    context: &Context,
    resource: GetResource,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    match resource {
        GetResource::Tier { name: Some(name) } => {
            let tier = context.client.get_tier(&name, context.stale).await?;
            context.print(streams.stdout, &tier, || {
                render::tier_table(std::slice::from_ref(&tier), render::now_ms())
            })
        }
        GetResource::Tier { name: None } => {
            let tiers = ItemList::new(context.client.list_tiers(context.stale).await?);
            context.print(streams.stdout, &tiers, || {
                if tiers.items.is_empty() {
                    "No tiers.\n".to_string()
                } else {
                    render::tier_table(&tiers.items, render::now_ms())
                }
            })
        }
        GetResource::Node { id: Some(id) } => {
            let node = context.client.get_node(&id, context.stale).await?;
            context.print(streams.stdout, &node, || {
                render::node_table(std::slice::from_ref(&node), render::now_ms())
            })
        }
        GetResource::Node { id: None } => {
            let nodes = ItemList::new(context.client.list_nodes(context.stale).await?);
            context.print(streams.stdout, &nodes, || {
                if nodes.items.is_empty() {
                    "No nodes.\n".to_string()
                } else {
                    render::node_table(&nodes.items, render::now_ms())
                }
            })
        }
        GetResource::Instance { tier } => {
            let instances = ItemList::new(
                context
                    .client
                    .list_instances(tier.as_deref(), context.stale)
                    .await?,
            );
            context.print(streams.stdout, &instances, || {
                if instances.items.is_empty() {
                    "No instances.\n".to_string()
                } else {
                    render::instance_table(&instances.items, render::now_ms())
                }
            })
        }
        GetResource::Pool { tier } => {
            let pool = context.client.get_pool(&tier, context.stale).await?;
            context.print(streams.stdout, &pool, || {
                render::pool_table(&pool, render::now_ms())
            })
        }
        GetResource::Endpoints { tier } => {
            let tier = context.client.get_tier(&tier, context.stale).await?;
            let endpoints = &tier.status.endpoints;
            context.print(streams.stdout, endpoints, || {
                if endpoints.is_empty() {
                    format!("No load balancer serves tier {} yet.\n", tier.name())
                } else {
                    endpoints
                        .iter()
                        .map(|endpoint| format!("{endpoint}\n"))
                        .collect()
                }
            })
        }
        GetResource::Event { object } => {
            let events = ItemList::new(
                context
                    .client
                    .list_events(object.as_deref(), context.stale)
                    .await?,
            );
            context.print(streams.stdout, &events, || {
                if events.items.is_empty() {
                    "No events.\n".to_string()
                } else {
                    render::event_table(&events.items, render::now_ms())
                }
            })
        }
    }
}

async fn describe(
    context: &Context,
    resource: DescribeResource,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    match resource {
        DescribeResource::Tier { name } => {
            let tier = context.client.get_tier(&name, context.stale).await?;
            // JSON and YAML print the object alone, as before; only the page needs the rest.
            let (instances, events, pool) = if context.output == OutputFormat::Table {
                let instances =
                    unless_not_found(context.client.list_instances(Some(&name), context.stale))
                        .await?;
                let object = format!("tier/{name}");
                let events =
                    unless_not_found(context.client.list_events(Some(&object), context.stale))
                        .await?;
                let pool = if tier.spec.load_balancer.listen.is_some() {
                    unless_not_found(context.client.get_pool(&name, context.stale)).await?
                } else {
                    None
                };
                (instances, events, pool)
            } else {
                (None, None, None)
            };
            let related = render::Related {
                instances: instances.as_deref(),
                events: events.as_deref(),
                pool: pool.as_ref(),
            };
            context.print(streams.stdout, &tier, || {
                render::describe_tier(&tier, related, render::now_ms())
            })
        }
        DescribeResource::Node { id } => {
            let node = context.client.get_node(&id, context.stale).await?;
            let (instances, events) = if context.output == OutputFormat::Table {
                // The API lists instances by tier, not by node; a node's are picked out here.
                let instances =
                    unless_not_found(context.client.list_instances(None, context.stale))
                        .await?
                        .map(|all| {
                            all.into_iter()
                                .filter(|instance| instance.node.as_deref() == Some(id.as_str()))
                                .collect::<Vec<_>>()
                        });
                let object = format!("node/{id}");
                let events =
                    unless_not_found(context.client.list_events(Some(&object), context.stale))
                        .await?;
                (instances, events)
            } else {
                (None, None)
            };
            let related = render::Related {
                instances: instances.as_deref(),
                events: events.as_deref(),
                pool: None,
            };
            context.print(streams.stdout, &node, || {
                render::describe_node(&node, related, render::now_ms())
            })
        }
    }
}

/// `Ok(None)` when the controller answers 404 for a section of a `describe` page: older
/// controllers lack the instance and event routes, and the page should still show the rest.
async fn unless_not_found<T>(
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<Option<T>, ClientError> {
    match call.await {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.problem().is_some_and(|problem| problem.status == 404) => {
            tracing::debug!(%error, "controller has no such route; leaving the section out");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The operator's verbs on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeAction {
    Cordon,
    Uncordon,
    Drain,
    Revoke,
}

async fn node_action(
    context: &Context,
    action: NodeAction,
    id: &str,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    let client = &context.client;
    let (node, done): (Node, &str) = match action {
        NodeAction::Cordon => (client.cordon_node(id).await?, "cordoned"),
        NodeAction::Uncordon => (client.uncordon_node(id).await?, "uncordoned"),
        // The controller only records the drain; instances move afterwards.
        NodeAction::Drain => (client.drain_node(id).await?, "draining"),
        NodeAction::Revoke => (client.revoke_node(id).await?, "credential revoked"),
    };
    context.print(streams.stdout, &node, || {
        format!("node/{} {done}\n", node.id)
    })
}

async fn delete(
    context: &Context,
    resource: DeleteResource,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    match resource {
        DeleteResource::Tier {
            name,
            resource_version,
        } => {
            let tier = context.client.delete_tier(&name, resource_version).await?;
            context.print(streams.stdout, &tier, || {
                format!("tier/{} deleted\n", tier.name())
            })
        }
    }
}

async fn scale(
    context: &Context,
    resource: ScaleResource,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    match resource {
        ScaleResource::Tier {
            name,
            replicas,
            replicas_flag,
            auto,
            resource_version,
        } => {
            let desired = replicas.or(replicas_flag);
            let request = ScaleRequest {
                desired,
                auto,
                resource_version,
            };
            let tier = context.client.scale_tier(&name, &request).await?;
            context.print(streams.stdout, &tier, || match desired {
                Some(count) => format!(
                    "tier/{} scaled to {count}; its autoscaler is paused until `stratactl scale tier {} --auto`\n",
                    tier.name(),
                    tier.name()
                ),
                None => format!(
                    "tier/{} handed back to the autoscaler at {} instances\n",
                    tier.name(),
                    tier.status.desired
                ),
            })
        }
    }
}

async fn cluster(
    context: &Context,
    command: ClusterCommand,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    match command {
        ClusterCommand::Status => {
            let status = context.client.cluster_status().await?;
            context.print(streams.stdout, &status, || render::cluster_status(&status))
        }
        ClusterCommand::AddMember {
            id,
            address,
            learner,
        } => {
            let request = AddMemberRequest {
                id,
                address,
                voter: !learner,
            };
            validate::add_member(&request)
                .map_err(|errors| CliError::Invalid(render::field_errors("member", &errors)))?;
            let status = context.client.add_member(&request).await?;
            let role = if learner { "learner" } else { "voter" };
            context.print(streams.stdout, &status, || {
                format!("member/{id} added as {role}\n")
            })
        }
        ClusterCommand::RemoveMember { id } => {
            let status = context.client.remove_member(id).await?;
            context.print(streams.stdout, &status, || format!("member/{id} removed\n"))
        }
    }
}

/// A client error in words, with the field paths of a validation problem on their own lines.
fn describe_client_error(error: &ClientError) -> String {
    match error {
        ClientError::Problem(problem) => describe_problem(problem),
        other => other.to_string(),
    }
}

fn describe_problem(problem: &Problem) -> String {
    let mut text = format!("{} ({})", problem.title, problem.status);
    if problem.errors.is_empty() {
        text.push_str(&format!(": {}", problem.detail));
    } else {
        text.push(':');
        for error in &problem.errors {
            text.push_str(&format!("\n  {}: {}", error.path, error.message));
        }
    }
    if let Some(version) = problem.current_resource_version {
        text.push_str(&format!(
            "\n  the object now has resource_version {version}; read it again before retrying"
        ));
    }
    text
}

#[cfg(test)]
mod tests;
