//! `stratactl`: the operator's command line, in the manner of kubectl.
//!
//! Commands are grouped by verb, then resource (`get tier web`, `scale tier web --replicas 3`),
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
use crate::problem::Problem;
use crate::tier::ScaleRequest;
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
    /// Controller API addresses (host:port or http://host:port), comma-separated; tried in
    /// turn until one answers.
    #[arg(
        long,
        global = true,
        env = "STRATA_SERVER",
        value_delimiter = ',',
        default_value = DEFAULT_SERVER,
        value_name = "ADDRESSES"
    )]
    pub server: Vec<String>,

    /// Bearer token sent with every request.
    #[arg(long, global = true, env = "STRATA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

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
    /// Show one resource in detail: its spec, status, conditions and last scaling decision.
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
}

#[derive(Debug, Subcommand)]
pub enum DescribeResource {
    /// Describe a tier.
    Tier {
        /// The tier to describe.
        name: String,
    },
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
    /// Pin a tier's instance count; it must lie within the tier's scaling.min and scaling.max.
    Tier {
        /// The tier to scale.
        name: String,
        /// The number of instances to run.
        #[arg(long, value_name = "N")]
        replicas: u32,
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
    let client = Client::new(ClientConfig {
        servers: cli.server,
        token: cli.token,
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
    }
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
            context.print(streams.stdout, &tier, || {
                render::describe_tier(&tier, render::now_ms())
            })
        }
    }
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
            resource_version,
        } => {
            let request = ScaleRequest {
                desired: replicas,
                resource_version,
            };
            let tier = context.client.scale_tier(&name, &request).await?;
            context.print(streams.stdout, &tier, || {
                format!("tier/{} scaled to {replicas}\n", tier.name())
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
