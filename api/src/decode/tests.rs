use super::*;
use crate::tier::{Condition, Provider, ScaleRequest, ScalingDecision, Tier, TierSpec, TierStatus};

const VALID: &str = r#"{
  "name": "web",
  "template": {"driver": "process", "command": ["strata-workload"]},
  "scaling": {"min": 1, "max": 3, "policies": [{"metric": "cpu_utilization", "target": 60}]}
}"#;

/// `VALID` with one JSON fragment substituted for another, so each case shows only its change.
fn valid_with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "fixture lacks {from:?}");
    VALID.replacen(from, to, 1)
}

fn single_error(body: &str) -> (u16, String, String) {
    match decode_json::<TierSpec>(body.as_bytes()) {
        Ok(spec) => panic!("expected an error, decoded {spec:?}"),
        Err(problem) => {
            assert_eq!(problem.errors.len(), 1, "{problem:?}");
            let error = &problem.errors[0];
            (problem.status, error.path.clone(), error.message.clone())
        }
    }
}

#[test]
fn decodes_a_valid_body() {
    let spec: TierSpec = decode_json(VALID.as_bytes()).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(spec.name, "web");
    assert_eq!(spec.provider, Provider::Local);
    assert_eq!(spec.scaling.policies[0].target, Some(60.0));
}

#[test]
fn unknown_fields_are_reported_at_their_own_path() {
    let cases = [
        (
            valid_with(r#""name": "web","#, r#""name": "web", "nmae": 1,"#),
            "nmae",
        ),
        (valid_with(r#""min": 1"#, r#""mni": 1"#), "scaling.mni"),
        (
            valid_with(r#""target": 60"#, r#""target": 60, "tagret": 1"#),
            "scaling.policies[0].tagret",
        ),
        (
            valid_with(
                r#""driver": "process""#,
                r#""driver": "process", "image": {"kernel": "k", "initrd": "i", "size": 3}"#,
            ),
            "template.image.size",
        ),
        (
            valid_with(
                r#""name": "web","#,
                r#""name": "web", "load_balancer": {"sticky": "x"},"#,
            ),
            "load_balancer.sticky",
        ),
        (
            valid_with(r#""name": "web","#, r#""name": "web", "odd key": 1,"#),
            "[\"odd key\"]",
        ),
    ];
    for (body, expected_path) in cases {
        let (status, path, message) = single_error(&body);
        assert_eq!(status, 422);
        assert_eq!(path, expected_path);
        assert!(message.starts_with("unknown field; expected"), "{message}");
    }
}

#[test]
fn unknown_field_message_lists_the_known_ones() {
    let (_, _, message) = single_error(&valid_with(r#""min": 1"#, r#""mni": 1"#));
    assert!(
        message.contains("`min`") && message.contains("`max`"),
        "{message}"
    );
}

#[test]
fn mistyped_and_missing_fields_name_the_field() {
    let cases = [
        (
            valid_with(r#""name": "web""#, r#""name": 7"#),
            "name",
            "invalid type",
        ),
        (
            valid_with(r#""min": 1"#, r#""min": "one""#),
            "scaling.min",
            "invalid type",
        ),
        (
            valid_with(r#""min": 1"#, r#""min": -1"#),
            "scaling.min",
            "invalid value",
        ),
        (
            valid_with(r#""target": 60"#, r#""target": "high""#),
            "scaling.policies[0].target",
            "invalid type",
        ),
        (
            valid_with(r#""metric": "cpu_utilization""#, r#""metric": "cpu""#),
            "scaling.policies[0].metric",
            "unknown variant",
        ),
        (
            valid_with(r#"["strata-workload"]"#, r#"["strata-workload", 3]"#),
            "template.command[1]",
            "invalid type",
        ),
        (
            valid_with(r#""driver": "process""#, r#""driver": "docker""#),
            "template.driver",
            "unknown variant",
        ),
        (
            valid_with(r#""min": 1"#, r#""min": 1, "cooldown": "soon""#),
            "scaling.cooldown",
            "invalid duration",
        ),
        (
            valid_with(r#""min": 1"#, r#""min": 1, "cooldown": 30"#),
            "scaling.cooldown",
            "invalid type",
        ),
        (
            valid_with(r#""min": 1, "#, ""),
            "scaling.min",
            "is required",
        ),
        (
            valid_with(r#""name": "web","#, r#""name": "web", "provider": "gcp","#),
            "provider",
            "unknown variant",
        ),
        (
            valid_with(
                r#""name": "web","#,
                r#""name": "web", "health": {"interval": "1x"},"#,
            ),
            "health.interval",
            "invalid duration",
        ),
        (
            valid_with(r#""name": "web","#, r#""name": "web", "template": 5,"#),
            "template",
            "invalid type",
        ),
        (
            valid_with(r#""name": "web","#, r#""name": "web", "name": "api","#),
            "name",
            "duplicate field",
        ),
    ];
    for (body, expected_path, expected_message) in cases {
        let (status, path, message) = single_error(&body);
        assert_eq!(status, 422, "{body}");
        assert_eq!(path, expected_path, "{body}");
        assert!(
            message.starts_with(expected_message),
            "{expected_path}: {message}"
        );
        assert!(!message.contains(" at line "), "location leaked: {message}");
    }
}

#[test]
fn missing_top_level_field_is_its_own_path() {
    let (status, path, message) =
        single_error(r#"{"name": "web", "scaling": {"min": 1, "max": 1}}"#);
    assert_eq!(
        (status, path.as_str(), message.as_str()),
        (422, "template", "is required")
    );
}

#[test]
fn wrong_type_at_the_root_is_reported_as_root() {
    let (status, path, _) = single_error("\"web\"");
    assert_eq!((status, path.as_str()), (422, "(root)"));
}

#[test]
fn malformed_json_is_a_400_with_its_location() {
    // A syntax error inside a field's value also names the field.
    let cases = [
        ("", 1, 0, None),
        ("{", 1, 1, None),
        (
            "{\"name\": \"web\",\n  \"scaling\": }",
            2,
            14,
            Some("scaling"),
        ),
        ("{'name': 1}", 1, 2, None),
    ];
    for (body, line, column, field) in cases {
        let problem = match decode_json::<TierSpec>(body.as_bytes()) {
            Ok(_) => panic!("{body:?} decoded"),
            Err(problem) => problem,
        };
        assert_eq!(problem.status, 400, "{body:?}: {problem:?}");
        assert_eq!(problem.problem_type, "urn:strata:problem:malformed");
        let paths: Vec<&str> = problem.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, field.into_iter().collect::<Vec<_>>(), "{body:?}");
        assert!(
            problem
                .detail
                .ends_with(&format!(" at line {line} column {column}")),
            "{body:?}: {}",
            problem.detail
        );
    }
}

#[test]
fn trailing_data_is_malformed() {
    let problem = decode_json::<TierSpec>(format!("{VALID} {{}}").as_bytes()).err();
    let problem = problem.unwrap_or_else(|| panic!("trailing data accepted"));
    assert_eq!(problem.status, 400);
    assert!(
        problem.detail.starts_with("trailing characters"),
        "{}",
        problem.detail
    );
}

#[test]
fn other_request_types_decode_with_paths() {
    let problem = decode_json::<ScaleRequest>(br#"{"desired": 3, "replicas": 3}"#).err();
    assert_eq!(
        problem.map(|p| p.errors[0].path.clone()).as_deref(),
        Some("replicas")
    );
}

#[test]
fn decode_value_reports_paths_too() {
    let value =
        serde_json::json!({"name": "web", "template": {}, "scaling": {"min": 1, "max": "x"}});
    let problem = decode_value::<TierSpec>(value).err();
    let error = problem.map(|p| (p.status, p.errors[0].path.clone()));
    assert_eq!(error, Some((422, "scaling.max".to_string())));
}

fn sample_tier() -> Tier {
    let mut spec: TierSpec = decode_json(VALID.as_bytes()).unwrap_or_else(|p| panic!("{p}"));
    spec.kind = Some("Tier".to_string());
    spec.resource_version = Some(42);
    spec.load_balancer.listen = "0.0.0.0:8080".parse().ok();
    spec.template.env.insert("GREETING".into(), "hi".into());
    Tier {
        spec,
        generation: 3,
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_100_000,
        status: TierStatus {
            desired: 2,
            current: 2,
            ready: 1,
            last_scaling: Some(ScalingDecision {
                at_ms: 1_700_000_050_000,
                from: 1,
                to: 2,
                reason: "cpu_utilization 85 > target 60".into(),
                inputs: None,
            }),
            conditions: vec![Condition {
                condition_type: "Ready".into(),
                status: false,
                reason: "Starting".into(),
                message: "1 of 2 instances ready".into(),
                since_ms: 1_700_000_060_000,
            }],
            ..TierStatus::default()
        },
    }
}

/// `Tier` flattens `TierSpec`, which denies unknown fields; the server's own output must still
/// read back, or every client would fail on the first GET.
#[test]
fn tier_round_trips_through_json() {
    let tier = sample_tier();
    let json = serde_json::to_vec(&tier).unwrap_or_default();
    let back: Tier = decode_json(&json).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(back, tier);
    assert_eq!(back.resource_version(), 42);
}

#[test]
fn tier_round_trips_through_yaml() {
    let tier = sample_tier();
    let yaml = serde_norway::to_string(&tier).unwrap_or_default();
    let documents = decode_documents(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(documents.len(), 1);
    let back: Tier = decode_value(documents[0].clone()).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(back, tier);
}

#[test]
fn a_tier_body_is_not_a_valid_spec() {
    // A client that GETs a tier and PUTs it back unchanged must learn which fields to drop.
    let json = serde_json::to_vec(&sample_tier()).unwrap_or_default();
    let problem = decode_json::<TierSpec>(&json).err();
    let path = problem.map(|p| p.errors[0].path.clone());
    assert!(
        matches!(
            path.as_deref(),
            Some("generation" | "created_at_ms" | "updated_at_ms" | "status")
        ),
        "{path:?}"
    );
}

#[test]
fn yaml_documents_are_split_and_empty_ones_skipped() {
    let text = "---\nname: web\nscaling: {min: 1, max: 2}\n---\n# only a comment\n---\nkind: Tier\nname: api\n...\n---\n";
    let documents = decode_documents(text).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = documents
        .iter()
        .filter_map(|d| d.get("name").and_then(|n| n.as_str()))
        .collect();
    assert_eq!(names, ["web", "api"]);
}

#[test]
fn yaml_values_keep_their_types() {
    let text = "name: web\ntemplate:\n  cpu: 0.25\n  port: 8080\n  command: [a, '--flag']\nscaling:\n  cooldown: 30s\n";
    let documents = decode_documents(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        documents,
        [serde_json::json!({
            "name": "web",
            "template": {"cpu": 0.25, "port": 8080, "command": ["a", "--flag"]},
            "scaling": {"cooldown": "30s"}
        })]
    );
}

#[test]
fn json_object_and_array_files() {
    let one = decode_documents(r#"  {"name": "web"}"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(one.len(), 1);
    let two =
        decode_documents(r#"[{"name": "a"}, {"name": "b"}]"#).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(two.len(), 2);
    let flow_yaml =
        decode_documents("{name: web, scaling: {min: 1}}").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(flow_yaml[0]["scaling"]["min"], 1);
}

#[test]
fn empty_file_has_no_documents() {
    for text in ["", "\n", "---\n", "# nothing\n"] {
        let documents = decode_documents(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(documents.is_empty(), "{text:?}");
    }
}

#[test]
fn bad_files_say_where() {
    match decode_documents("{\"name\": \"web\",\n\"x\": [}") {
        Err(DocumentsError::Json { line: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    match decode_documents("name: web\n---\nname: [unclosed\n") {
        Err(DocumentsError::Yaml { document: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    match decode_documents("name: web\n---\njust text\n") {
        Err(DocumentsError::NotAnObject {
            document: 2,
            found: "a string",
        }) => {}
        other => panic!("{other:?}"),
    }
    match decode_documents("[{\"name\": \"a\"}, 3]") {
        Err(DocumentsError::NotAnObject {
            document: 2,
            found: "a number",
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// Files written before policies had types, tolerances and schedules keep their meaning.
#[test]
fn scaling_blocks_of_earlier_files_still_decode_the_same() {
    let text = "name: web\ntemplate: {driver: process, command: [w]}\nscaling:\n  min: 2\n  max: 8\n  policies: [{metric: cpu_utilization, target: 60}]\n  cooldown: 45s\n  scale_in_stabilization: 2m\n  max_step: 3\n  step_period: 30s\n";
    let documents = decode_documents(text).unwrap_or_else(|e| panic!("{e}"));
    let spec: TierSpec = decode_value(documents[0].clone()).unwrap_or_else(|p| panic!("{p}"));
    let scaling = &spec.scaling;
    assert_eq!((scaling.min, scaling.max), (2, 8));
    let policy = &scaling.policies[0];
    assert_eq!(policy.policy_type, crate::tier::PolicyType::TargetTracking);
    assert_eq!(policy.metric, crate::tier::ScalingMetric::CpuUtilization);
    assert_eq!(policy.target, Some(60.0));
    assert_eq!(scaling.cooldown, crate::Duration::from_secs(45));
    assert_eq!(
        scaling.scale_in_stabilization,
        Some(crate::Duration::from_secs(120))
    );
    assert_eq!(scaling.max_step, 3);
    assert_eq!(scaling.step_period, crate::Duration::from_secs(30));
    assert_eq!(crate::validate::tier_spec(&spec), Ok(()));
}

#[test]
fn a_policy_on_an_unknown_metric_is_refused_at_its_path() {
    let (status, path, message) = single_error(&valid_with(
        r#""metric": "cpu_utilization""#,
        r#""metric": "queue_depth""#,
    ));
    assert_eq!((status, path.as_str()), (422, "scaling.policies[0].metric"));
    assert!(message.contains("unknown variant"), "{message}");
}

#[test]
fn text_that_is_no_number_inside_a_field_names_the_field() {
    for body in [
        &br#"{"metric": "queue_depth", "value": 1e999}"#[..],
        &br#"{"metric": "queue_depth", "value": NaN}"#[..],
        &br#"{"metric": "queue_depth", "value": -Infinity}"#[..],
    ] {
        let problem = decode_json::<crate::tier::CustomMetricSample>(body)
            .err()
            .unwrap_or_else(|| panic!("{} decoded", String::from_utf8_lossy(body)));
        assert_eq!(problem.status, 400, "{problem}");
        let paths: Vec<&str> = problem.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["value"], "{problem}");
    }
}
