//! Load traces: CSV files of `timestamp,value` (the two real NAB traces in `bench/traces/` or
//! any file given with `--trace`) and four generated shapes, each turned into a demand in
//! requests per second for every simulated second.
//!
//! A replay rescales both axes, as `bench/traces/README.md` describes: time is compressed so
//! that `points_per_second` trace points play per simulated second (between two points the
//! load moves linearly), and values are scaled so that the trace's peak needs
//! `peak_instances` instances at full capacity.

use std::fmt;

use chrono::{DateTime, NaiveDateTime};
use serde::Serialize;

/// A trace as read from a file: timestamps in seconds (Unix time for dates) and values.
#[derive(Clone, Debug, PartialEq)]
pub struct Points {
    pub timestamps: Vec<f64>,
    pub values: Vec<f64>,
}

/// A line of a trace file that cannot be read, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for TraceError {}

fn error(line: usize, message: impl Into<String>) -> TraceError {
    TraceError {
        line,
        message: message.into(),
    }
}

/// Parses CSV `timestamp,value`, one point a line. A first line whose fields are neither a
/// timestamp nor a number is a header; blank lines are skipped. Timestamps are
/// `YYYY-MM-DD HH:MM:SS` (the NAB format), RFC 3339, or plain seconds, and must increase;
/// values must be finite and not negative. Every other line is an error naming the line.
pub fn parse_csv(text: &str) -> Result<Points, TraceError> {
    let mut points = Points {
        timestamps: Vec::new(),
        values: Vec::new(),
    };
    let mut first = true;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim();
        if content.is_empty() {
            continue;
        }
        let is_first = std::mem::replace(&mut first, false);
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        if fields.len() != 2 {
            return Err(error(
                line,
                format!(
                    "expected two fields `timestamp,value`, found {}: `{content}`",
                    fields.len()
                ),
            ));
        }
        let timestamp = parse_timestamp(fields[0]);
        let value = fields[1].parse::<f64>();
        if is_first && timestamp.is_none() && value.is_err() {
            continue; // the header
        }
        let Some(timestamp) = timestamp else {
            return Err(error(
                line,
                format!(
                    "timestamp `{}` is neither `YYYY-MM-DD HH:MM:SS`, RFC 3339 nor a number of seconds",
                    fields[0]
                ),
            ));
        };
        let value = match value {
            Ok(value) if value.is_finite() && value >= 0.0 => value,
            Ok(_) => {
                return Err(error(
                    line,
                    format!("value `{}` must be finite and not negative", fields[1]),
                ))
            }
            Err(_) => {
                return Err(error(
                    line,
                    format!("value `{}` is not a number", fields[1]),
                ))
            }
        };
        if let Some(&previous) = points.timestamps.last() {
            if timestamp <= previous {
                return Err(error(
                    line,
                    format!(
                        "timestamp `{}` does not come after the previous line's",
                        fields[0]
                    ),
                ));
            }
        }
        points.timestamps.push(timestamp);
        points.values.push(value);
    }
    if points.values.len() < 2 {
        return Err(error(0, "a trace needs at least two points"));
    }
    if points.values.iter().all(|&v| v == 0.0) {
        return Err(error(0, "every value is zero: nothing to scale to a peak"));
    }
    Ok(points)
}

fn parse_timestamp(text: &str) -> Option<f64> {
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds.is_finite().then_some(seconds);
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Some(time.and_utc().timestamp_millis() as f64 / 1000.0);
        }
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp_millis() as f64 / 1000.0)
}

impl Points {
    /// The median step between two points, in the timestamps' seconds.
    pub fn resolution_s(&self) -> f64 {
        let mut steps: Vec<f64> = self.timestamps.windows(2).map(|w| w[1] - w[0]).collect();
        steps.sort_by(f64::total_cmp);
        steps[steps.len() / 2]
    }

    /// Keeps the first `count` points.
    pub fn truncate(&mut self, count: usize) {
        self.timestamps.truncate(count.max(2));
        self.values.truncate(count.max(2));
    }
}

/// How a trace was turned into demand: what a result must say it used.
#[derive(Clone, Debug, Serialize)]
pub struct Replay {
    /// Points in the source (for generated traces: simulated seconds).
    pub points: usize,
    /// Median step between two points of the source, in real seconds.
    pub resolution_s: f64,
    /// Source points replayed per simulated second.
    pub points_per_second: f64,
    /// Real seconds per simulated second.
    pub compression: f64,
    pub simulated_seconds: u64,
    /// The demand at the trace's peak, in requests per second: `peak_instances × capacity`.
    pub peak_rps: f64,
    /// Requests per second per unit of the source's value.
    pub scale: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A trace ready to run: demand in requests per second for each simulated second.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    pub source: String,
    pub replay: Replay,
    pub demand: Vec<f64>,
}

/// The default compression: one real minute per simulated second. Slow enough that a burst of
/// the 5-minute Twitter trace lasts several seconds of simulation and start-up, metric lag and
/// stabilization act on the trace's shape, fast enough that a day of the taxi trace is 24
/// simulated minutes.
pub const DEFAULT_COMPRESSION: f64 = 60.0;

/// Replays `points`: point `i` plays at `(t_i - t_0) / resolution / points_per_second`
/// simulated seconds, the load moves linearly between points, and each simulated second gets
/// the mean load over it. Values are scaled so that the largest is `peak_rps`.
pub fn replay(
    name: &str,
    source: &str,
    points: &Points,
    points_per_second: f64,
    peak_rps: f64,
) -> Trace {
    let resolution = points.resolution_s();
    let start = points.timestamps[0];
    let at: Vec<f64> = points
        .timestamps
        .iter()
        .map(|t| (t - start) / resolution / points_per_second)
        .collect();
    let peak = points.values.iter().copied().fold(0.0, f64::max);
    let scale = peak_rps / peak;
    let last = *at.last().unwrap_or(&0.0);
    let seconds = last.floor() as u64 + 1;
    // Sub-samples per second: enough to see every point when several play in one second.
    let samples = (points_per_second.ceil() as usize).clamp(1, 64);
    let mut demand = Vec::with_capacity(seconds as usize);
    let mut segment = 0usize;
    for second in 0..seconds {
        let mut sum = 0.0;
        for k in 0..samples {
            let t = second as f64 + (k as f64 + 0.5) / samples as f64;
            while segment + 2 < at.len() && at[segment + 1] <= t {
                segment += 1;
            }
            let (t0, t1) = (at[segment], at[segment + 1]);
            let (v0, v1) = (points.values[segment], points.values[segment + 1]);
            let share = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0);
            sum += v0 + (v1 - v0) * share;
        }
        demand.push(sum / samples as f64 * scale);
    }
    Trace {
        name: name.to_string(),
        source: source.to_string(),
        replay: Replay {
            points: points.values.len(),
            resolution_s: resolution,
            points_per_second,
            compression: resolution * points_per_second,
            simulated_seconds: seconds,
            peak_rps,
            scale,
            seed: None,
        },
        demand,
    }
}

/// The generated shapes, as fractions of the peak for each second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// 20% for 10 min, 100% for 30 min, 20% for 20 min.
    Step,
    /// 10% for 10 min, up to 100% over 10 min, 20 min there, down over 10 min, 10 min at
    /// 10%: a launch or a morning rush, steep enough that reaction time shows.
    Ramp,
    /// 20% with a 3-minute spike to 100% at 15 min and a 1-minute one at 40 min, for an hour.
    Spike,
    /// Four 30-minute "days" shaped like a web site's: a quiet night at 15%, a morning rush
    /// to 75% in 3 minutes, a midday plateau with a dip, an evening peak at 100%, and a long
    /// decline (keyframes in `DAY`, eased between).
    Diurnal,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Step, Shape::Ramp, Shape::Spike, Shape::Diurnal];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Step => "step",
            Shape::Ramp => "ramp",
            Shape::Spike => "spike",
            Shape::Diurnal => "diurnal",
        }
    }

    fn seconds(self) -> u64 {
        match self {
            Shape::Step => 3_600,
            Shape::Ramp => 3_600,
            Shape::Spike => 3_600,
            Shape::Diurnal => 7_200,
        }
    }

    /// The load at second `t` as a fraction of the peak, before noise.
    fn level(self, t: u64) -> f64 {
        let minutes = t as f64 / 60.0;
        match self {
            Shape::Step => {
                if (10.0..40.0).contains(&minutes) {
                    1.0
                } else {
                    0.2
                }
            }
            Shape::Ramp => {
                if minutes < 10.0 {
                    0.1
                } else if minutes < 20.0 {
                    0.1 + 0.9 * (minutes - 10.0) / 10.0
                } else if minutes < 40.0 {
                    1.0
                } else if minutes < 50.0 {
                    1.0 - 0.9 * (minutes - 40.0) / 10.0
                } else {
                    0.1
                }
            }
            Shape::Spike => {
                if (15.0..18.0).contains(&minutes) || (40.0..41.0).contains(&minutes) {
                    1.0
                } else {
                    0.2
                }
            }
            Shape::Diurnal => {
                let day = (minutes / 30.0).fract();
                let index = DAY.iter().rposition(|&(at, _)| at <= day).unwrap_or(0);
                let (at0, level0) = DAY[index];
                let (at1, level1) = DAY[(index + 1).min(DAY.len() - 1)];
                let share = if at1 > at0 {
                    (day - at0) / (at1 - at0)
                } else {
                    0.0
                };
                // Cosine easing: no kinks at the keyframes.
                let eased = (1.0 - (share * std::f64::consts::PI).cos()) / 2.0;
                level0 + (level1 - level0) * eased
            }
        }
    }
}

/// A day of the diurnal shape: (share of the day, share of the peak).
const DAY: [(f64, f64); 9] = [
    (0.0, 0.15),
    (0.2, 0.15),
    (0.3, 0.75),
    (0.45, 0.8),
    (0.55, 0.65),
    (0.7, 0.8),
    (0.78, 1.0),
    (0.85, 0.9),
    (1.0, 0.15),
];

/// How far generated load strays from its shape: a multiplicative noise whose deviations last
/// about `NOISE_CORRELATION_S` (real traffic drifts in bursts, not independently each second),
/// with a standard deviation of `NOISE_SD`.
pub const NOISE_SD: f64 = 0.05;
pub const NOISE_CORRELATION_S: f64 = 30.0;

/// A generated trace: the shape times `peak_rps` and the seeded noise, never above the peak.
pub fn generate(shape: Shape, peak_rps: f64, seed: u64) -> Trace {
    let mut random = SplitMix64::new(seed ^ fnv1a(shape.name()));
    // An AR(1) process with unit variance: x' = a·x + sqrt(1 - a²)·e, e uniform with unit
    // variance.
    let a = (-1.0 / NOISE_CORRELATION_S).exp();
    let spread = (1.0 - a * a).sqrt() * 3f64.sqrt();
    let mut x = 0.0;
    let demand: Vec<f64> = (0..shape.seconds())
        .map(|t| {
            x = a * x + spread * (2.0 * random.next_f64() - 1.0);
            let noise = (1.0 + NOISE_SD * x).clamp(0.8, 1.2);
            (shape.level(t) * noise).min(1.0) * peak_rps
        })
        .collect();
    Trace {
        name: shape.name().to_string(),
        source: "generated".to_string(),
        replay: Replay {
            points: demand.len(),
            resolution_s: 1.0,
            points_per_second: 1.0,
            compression: 1.0,
            simulated_seconds: demand.len() as u64,
            peak_rps,
            scale: peak_rps,
            seed: Some(seed),
        },
        demand,
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator whose output for a seed never
/// changes with a dependency's version, so generated traces stay the same across builds.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_nab_format_with_its_header() {
        let points =
            parse_csv("timestamp,value\n2014-07-01 00:00:00,10844\n2014-07-01 00:30:00,8127\n")
                .expect("parses");
        assert_eq!(points.values, [10844.0, 8127.0]);
        assert_eq!(points.timestamps[1] - points.timestamps[0], 1800.0);
        assert_eq!(points.timestamps[0], 1_404_172_800.0);
        assert_eq!(points.resolution_s(), 1800.0);
        // RFC 3339 and plain seconds too, blank lines skipped, no header needed.
        let points =
            parse_csv("2015-02-26T21:42:53Z,57\n\n2015-02-26T21:47:53Z, 43\n").expect("parses");
        assert_eq!(points.resolution_s(), 300.0);
        let points = parse_csv("0,1\n1.5,2\n3,0\n").expect("parses");
        assert_eq!(points.timestamps, [0.0, 1.5, 3.0]);
    }

    #[test]
    fn bad_lines_are_named_with_what_is_wrong() {
        let cases = [
            ("timestamp,value\n0,1\n1;2\n", 3, "expected two fields"),
            ("0,1\n1,2,3\n", 2, "expected two fields"),
            ("0,1\nyesterday,2\n", 2, "timestamp `yesterday`"),
            ("0,1\n1,many\n", 2, "value `many` is not a number"),
            ("0,1\n1,-4\n", 2, "must be finite and not negative"),
            ("0,1\n1,NaN\n", 2, "must be finite and not negative"),
            ("0,1\n1,inf\n", 2, "must be finite and not negative"),
            ("0,1\n5,2\n5,3\n", 3, "does not come after"),
            ("0,1\n5,2\n4,3\n", 3, "does not come after"),
            // A first line with a good timestamp and a bad value is not a header.
            (
                "2014-07-01 00:00:00,abc\n2014-07-01 00:30:00,1\n",
                1,
                "not a number",
            ),
        ];
        for (text, line, message) in cases {
            let error = parse_csv(text).expect_err(text);
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.message.contains(message), "{text:?}: {error}");
            assert!(error.to_string().starts_with(&format!("line {line}: ")));
        }
        assert!(parse_csv("timestamp,value\n0,1\n")
            .expect_err("one point")
            .to_string()
            .contains("at least two points"));
        assert!(parse_csv("")
            .expect_err("empty")
            .to_string()
            .contains("at least two points"));
        assert!(parse_csv("0,0\n1,0\n")
            .expect_err("zeros")
            .to_string()
            .contains("every value is zero"));
    }

    #[test]
    fn replay_compresses_time_interpolates_and_scales_to_the_peak() {
        let points = Points {
            timestamps: vec![0.0, 300.0, 600.0],
            values: vec![10.0, 30.0, 20.0],
        };
        // One point every 2 simulated seconds: points at 0, 2 and 4 s.
        let trace = replay("t", "test", &points, 0.5, 300.0);
        assert_eq!(trace.replay.compression, 150.0);
        assert_eq!(trace.replay.simulated_seconds, 5);
        assert_eq!(trace.replay.scale, 10.0);
        // Second 0 is the mean at 0.5 s: a quarter of the way from 10 to 30.
        let expected = [150.0, 250.0, 275.0, 225.0, 200.0];
        for (got, want) in trace.demand.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{:?}", trace.demand);
        }
        // Several points per second are averaged.
        let points = Points {
            timestamps: (0..8).map(f64::from).collect(),
            values: vec![0.0, 4.0, 0.0, 4.0, 0.0, 4.0, 0.0, 4.0],
        };
        let trace = replay("t", "test", &points, 4.0, 4.0);
        assert_eq!(trace.demand.len(), 2);
        assert!((trace.demand[0] - 2.0).abs() < 1e-9, "{:?}", trace.demand);
    }

    #[test]
    fn generated_traces_are_deterministic_and_bounded() {
        for shape in Shape::ALL {
            let a = generate(shape, 2_000.0, 7);
            let b = generate(shape, 2_000.0, 7);
            let c = generate(shape, 2_000.0, 8);
            assert_eq!(a.demand, b.demand, "{}", shape.name());
            assert_ne!(a.demand, c.demand, "{}", shape.name());
            assert!(a.demand.iter().all(|&d| d > 0.0 && d <= 2_000.0));
            let peak = a.demand.iter().copied().fold(0.0, f64::max);
            assert!(peak > 1_900.0, "{}: {peak}", shape.name());
        }
        let step = generate(Shape::Step, 1_000.0, 1);
        assert!((step.demand[599] / 200.0 - 1.0).abs() <= 0.2);
        assert!(step.demand[600] / 1_000.0 >= 0.8);
        // The noise has the standard deviation it claims, and lasts.
        let deviations: Vec<f64> = step.demand[..600].iter().map(|d| d / 200.0 - 1.0).collect();
        let sd = (deviations.iter().map(|d| d * d).sum::<f64>() / 600.0).sqrt();
        assert!((0.02..0.08).contains(&sd), "{sd}");
        let lag: f64 = deviations.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / 599.0;
        assert!(
            lag / (sd * sd) > 0.8,
            "one-second autocorrelation {}",
            lag / (sd * sd)
        );
    }

    #[test]
    fn the_bundled_traces_parse() {
        for text in [
            include_str!("../../traces/nyc_taxi.csv"),
            include_str!("../../traces/twitter_volume_amzn.csv"),
        ] {
            let points = parse_csv(text).expect("bundled trace");
            assert!(points.values.len() > 10_000);
        }
    }
}
