//! A linearizability checker for read/write registers whose writes carry unique values, after
//! Gibbons and Korach ("Testing shared memories", SIAM J. Comput. 26(4), 1997), in
//! O(n log n) per register.
//!
//! Group every operation by the value it wrote or read: a *cluster* is one write and the reads
//! that returned its value. With `min_end` the earliest response in a cluster and `max_start`
//! the latest invocation, a cluster whose `min_end < max_start` has a *forward zone*
//! `(min_end, max_start)`: some operation of it finished before another started, so its value
//! must be the register's value throughout that interval. Otherwise it has a *backward zone*
//! `(max_start, min_end)`: all its operations overlap, and it may be linearized at one point
//! in there. A history is linearizable if and only if every read returns a value that was
//! written (or the initial value) by a write that did not begin after the read ended, no two
//! forward zones intersect, and no backward zone lies inside another cluster's forward zone.
//!
//! Unknown outcomes (timeouts, answers that cannot say whether a write was applied) are never
//! counted as failures: an unknown write may take effect at any time after its invocation
//! (its response is at infinity), and one that no read observed may also never have happened,
//! so it is left out. Definitely failed writes (refused before anything was proposed) are left
//! out; reads without an answer tell nothing and are left out.

use std::collections::BTreeMap;
use std::fmt;

/// What one operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

/// One operation of a history, with times in microseconds on one monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: usize,
    pub kind: Kind,
    /// The value written, or the value a read returned (`None` for a read without answer).
    pub value: Option<u64>,
    pub start_us: u64,
    /// When the answer arrived; `None` when the outcome is unknown.
    pub end_us: Option<u64>,
    /// The operation surely had no effect (a write refused before it was proposed).
    pub failed: bool,
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One value's cluster.
#[derive(Debug)]
struct Cluster {
    write_start: u64,
    /// `u64::MAX` for a write whose outcome is unknown.
    write_end: u64,
    min_end: u64,
    max_start: u64,
    reads: usize,
}

/// Checks one register's history. `initial` is the value the register held before every
/// operation of the history (written at time 0).
pub fn check(history: &[Op], initial: u64) -> Result<(), Violation> {
    let mut clusters: BTreeMap<u64, Cluster> = BTreeMap::new();
    clusters.insert(
        initial,
        Cluster {
            write_start: 0,
            write_end: 0,
            min_end: 0,
            max_start: 0,
            reads: 0,
        },
    );
    for op in history
        .iter()
        .filter(|op| op.kind == Kind::Write && !op.failed)
    {
        let Some(value) = op.value else {
            return Err(Violation(format!("a write without a value: {op:?}")));
        };
        let end = op.end_us.unwrap_or(u64::MAX);
        let cluster = Cluster {
            write_start: op.start_us,
            write_end: end,
            min_end: end,
            max_start: op.start_us,
            reads: 0,
        };
        if clusters.insert(value, cluster).is_some() {
            return Err(Violation(format!(
                "value {value} is written twice: values must be unique"
            )));
        }
    }
    for op in history.iter().filter(|op| op.kind == Kind::Read) {
        let (Some(value), Some(end)) = (op.value, op.end_us) else {
            continue;
        };
        let Some(cluster) = clusters.get_mut(&value) else {
            return Err(Violation(format!(
                "client {} read {value} at {}..{} µs, a value nobody wrote",
                op.client, op.start_us, end
            )));
        };
        if end < cluster.write_start {
            return Err(Violation(format!(
                "client {} read {value} at {}..{end} µs, before its write began at {} µs",
                op.client, op.start_us, cluster.write_start
            )));
        }
        cluster.min_end = cluster.min_end.min(end);
        cluster.max_start = cluster.max_start.max(op.start_us);
        cluster.reads += 1;
    }
    let mut forward: Vec<(u64, u64, u64)> = Vec::new();
    let mut backward: Vec<(u64, u64, u64)> = Vec::new();
    for (value, cluster) in &clusters {
        // An unknown write nobody read may never have happened.
        if cluster.write_end == u64::MAX && cluster.reads == 0 {
            continue;
        }
        if cluster.min_end < cluster.max_start {
            forward.push((cluster.min_end, cluster.max_start, *value));
        } else {
            backward.push((cluster.max_start, cluster.min_end, *value));
        }
    }
    forward.sort_unstable();
    for pair in forward.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(Violation(format!(
                "values {first} and {second} must each have been the register's value over \
                 overlapping intervals (forward zones {:?} and {:?}, µs)",
                (pair[0].0, pair[0].1),
                (pair[1].0, pair[1].1)
            )));
        }
    }
    for (start, end, value) in backward {
        // The forward zone starting last before this backward zone starts is the only one
        // that can contain it, as forward zones do not overlap.
        let candidate = forward.partition_point(|zone| zone.0 < start);
        if let Some(&(zone_start, zone_end, holder)) = candidate.checked_sub(1).map(|i| &forward[i])
        {
            if zone_end > end && holder != value {
                return Err(Violation(format!(
                    "value {value} was read or written entirely within ({start}..{end} µs) an \
                     interval in which the register must have held {holder} \
                     ({zone_start}..{zone_end} µs): a stale read or a lost write"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(value: u64, start_us: u64, end_us: u64) -> Op {
        Op {
            client: 0,
            kind: Kind::Write,
            value: Some(value),
            start_us,
            end_us: Some(end_us),
            failed: false,
        }
    }

    fn read(value: u64, start_us: u64, end_us: u64) -> Op {
        Op {
            client: 1,
            kind: Kind::Read,
            value: Some(value),
            start_us,
            end_us: Some(end_us),
            failed: false,
        }
    }

    fn unknown_write(value: u64, start_us: u64) -> Op {
        Op {
            end_us: None,
            ..write(value, start_us, 0)
        }
    }

    #[test]
    fn sequential_reads_of_the_latest_write_are_linearizable() {
        let history = [
            read(0, 1, 2),
            write(1, 3, 4),
            read(1, 5, 6),
            write(2, 7, 8),
            read(2, 9, 10),
        ];
        assert_eq!(check(&history, 0), Ok(()));
    }

    #[test]
    fn a_stale_read_after_a_newer_write_completed_is_caught() {
        let history = [write(1, 0, 1), write(2, 2, 3), read(1, 4, 5)];
        let violation = check(&history, 0).expect_err("a stale read");
        assert!(violation.0.contains("stale read"), "{violation}");
    }

    #[test]
    fn concurrent_operations_may_be_ordered_either_way() {
        // The read overlaps both writes: it may see either.
        let history = [write(1, 0, 10), write(2, 5, 15), read(1, 12, 20)];
        assert_eq!(check(&history, 0), Ok(()));
        let history = [write(1, 0, 10), write(2, 5, 15), read(2, 6, 9)];
        assert_eq!(check(&history, 0), Ok(()));
    }

    #[test]
    fn reading_a_value_never_written_or_before_its_write_is_caught() {
        assert!(check(&[read(9, 0, 1)], 0).is_err());
        assert!(check(&[read(1, 0, 1), write(1, 2, 3)], 0).is_err());
    }

    #[test]
    fn two_values_that_alternate_are_caught() {
        // 1 then 2 then 1 again, each read strictly after the previous one.
        let history = [
            write(1, 0, 1),
            write(2, 0, 1),
            read(1, 2, 3),
            read(2, 4, 5),
            read(1, 6, 7),
        ];
        assert!(check(&history, 0).is_err());
    }

    #[test]
    fn an_unknown_write_may_take_effect_late_or_never() {
        // Never observed: as if it never happened.
        let history = [unknown_write(1, 0), read(0, 100, 101)];
        assert_eq!(check(&history, 0), Ok(()));
        // Observed long after its invocation: it took effect late, which is allowed.
        let history = [unknown_write(1, 0), read(0, 100, 101), read(1, 200, 201)];
        assert_eq!(check(&history, 0), Ok(()));
        // But once observed, an older value cannot come back.
        let history = [unknown_write(1, 0), read(1, 200, 201), read(0, 300, 301)];
        assert!(check(&history, 0).is_err());
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught_by_a_later_read() {
        let history = [
            write(1, 0, 1),
            write(2, 2, 3),
            read(1, 10, 11),
            read(1, 0, 1),
        ];
        assert!(check(&history, 0).is_err());
    }

    #[test]
    fn failed_writes_are_left_out() {
        let mut refused = write(1, 0, 1);
        refused.failed = true;
        assert_eq!(check(&[refused, read(0, 2, 3)], 0), Ok(()));
    }
}
