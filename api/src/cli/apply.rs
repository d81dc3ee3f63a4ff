//! `stratactl apply -f FILE`: every document is decoded and validated before anything is sent,
//! so a file with one broken tier changes nothing; then each tier is sent in file order and a
//! failure of one does not stop the others.

use super::{describe_problem, ApplyArgs, CliError, Context, OutputFormat, Streams};
use crate::decode::{decode_documents, decode_value};
use crate::list::ItemList;
use crate::tier::{TierSpec, TIER_KIND};
use crate::validate;

pub(super) async fn run(
    context: &Context,
    args: &ApplyArgs,
    streams: &mut Streams<'_>,
) -> Result<(), CliError> {
    let (label, text) = read_source(&args.filename, streams)?;
    let documents = decode_documents(&text).map_err(|source| CliError::Documents {
        path: label.clone(),
        source,
    })?;
    if documents.is_empty() {
        return Err(CliError::NoDocuments { path: label });
    }
    let specs = check_documents(documents).map_err(CliError::Invalid)?;

    let total = specs.len();
    let mut failed = 0;
    let mut applied = Vec::new();
    for spec in &specs {
        match context.client.put_tier(spec).await {
            Ok(outcome) => {
                if context.output == OutputFormat::Table {
                    let verb = if outcome.created {
                        "created"
                    } else {
                        "configured"
                    };
                    writeln!(streams.stdout, "tier/{} {verb}", outcome.tier.name())?;
                }
                applied.push(outcome.tier);
            }
            Err(error) => {
                failed += 1;
                let reason = match &error {
                    crate::client::ClientError::Problem(problem) => describe_problem(problem),
                    other => other.to_string(),
                };
                writeln!(streams.stderr, "error: tier/{}: {reason}", spec.name)?;
            }
        }
    }
    if context.output != OutputFormat::Table {
        context.print(streams.stdout, &ItemList::new(applied), String::new)?;
    }
    if failed > 0 {
        return Err(CliError::ApplyFailed { failed, total });
    }
    Ok(())
}

fn read_source(filename: &str, streams: &mut Streams<'_>) -> Result<(String, String), CliError> {
    let mut text = String::new();
    if filename == "-" {
        streams
            .stdin
            .read_to_string(&mut text)
            .map_err(|source| CliError::ReadFile {
                path: "standard input".to_string(),
                source,
            })?;
        Ok(("standard input".to_string(), text))
    } else {
        let text = std::fs::read_to_string(filename).map_err(|source| CliError::ReadFile {
            path: filename.to_string(),
            source,
        })?;
        Ok((filename.to_string(), text))
    }
}

/// Decodes and validates every document; on any problem, returns the text listing all of
/// them, each under the document it belongs to.
pub(super) fn check_documents(documents: Vec<serde_json::Value>) -> Result<Vec<TierSpec>, String> {
    let mut specs = Vec::new();
    let mut reports = Vec::new();
    for (position, document) in documents.into_iter().enumerate() {
        let number = position + 1;
        let name = document
            .get("name")
            .and_then(|name| name.as_str())
            .map(str::to_string);
        let label = match &name {
            Some(name) => format!("tier/{name} (document {number})"),
            None => format!("document {number}"),
        };
        match document.get("kind") {
            None => {}
            Some(serde_json::Value::String(kind)) if kind == TIER_KIND => {}
            Some(serde_json::Value::String(kind)) => {
                reports.push(format!(
                    "document {number}: unknown kind {kind:?}; stratactl apply accepts: {TIER_KIND}"
                ));
                continue;
            }
            Some(other) => {
                reports.push(format!(
                    "document {number}: kind must be a string such as \"{TIER_KIND}\", not {other}"
                ));
                continue;
            }
        }
        let spec = match decode_value::<TierSpec>(document) {
            Ok(spec) => spec,
            Err(problem) => {
                reports.push(super::render::field_errors(&label, &problem.errors));
                continue;
            }
        };
        match validate::tier_spec(&spec) {
            Ok(()) => specs.push(spec),
            Err(errors) => reports.push(super::render::field_errors(&label, &errors)),
        }
    }
    if reports.is_empty() {
        Ok(specs)
    } else {
        let count = reports.len();
        let heading = if count == 1 {
            "nothing was applied:".to_string()
        } else {
            format!("nothing was applied; {count} documents have problems:")
        };
        Err(std::iter::once(heading)
            .chain(reports)
            .collect::<Vec<_>>()
            .join("\n"))
    }
}
