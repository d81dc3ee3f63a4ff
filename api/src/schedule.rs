//! Cron schedules in IANA time zones, for `scaling.schedules`.
//!
//! Validation and the autoscaler parse schedules here, so what is accepted is exactly what
//! runs. Expressions have the five standard fields; they are evaluated in local time of their
//! zone (through `cron` and `chrono-tz`), which is what makes `0 8 * * MON-FRI` fire at 08:00
//! in both winter and summer time. Days of the week must be names: the `cron` crate numbers
//! them 1-7 from Sunday, classic cron 0-6 from Sunday, and a silent off-by-one would shift a
//! weekday schedule onto the weekend.

use std::str::FromStr;

use chrono::TimeZone;
use chrono_tz::Tz;

/// A parsed `cron` + `time_zone` pair.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    schedule: cron::Schedule,
    zone: Tz,
}

/// Which of the two fields is wrong, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Cron(String),
    #[error("{0}")]
    TimeZone(String),
}

impl CronSchedule {
    /// Parses a five-field expression and an IANA zone name.
    pub fn parse(expression: &str, time_zone: &str) -> Result<CronSchedule, ScheduleError> {
        let zone = Tz::from_str(time_zone).map_err(|_| {
            ScheduleError::TimeZone(format!(
                "unknown time zone {time_zone:?}: use an IANA name such as Europe/Paris or UTC"
            ))
        })?;
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(ScheduleError::Cron(format!(
                "must have 5 fields (minute hour day-of-month month day-of-week), not {}",
                fields.len()
            )));
        }
        if fields[4].bytes().any(|b| b.is_ascii_digit()) {
            return Err(ScheduleError::Cron(
                "write days of the week as names (MON-FRI, SUN): cron dialects number them differently"
                    .to_string(),
            ));
        }
        // The `cron` crate wants seconds first.
        let schedule = cron::Schedule::from_str(&format!("0 {}", fields.join(" ")))
            .map_err(|error| ScheduleError::Cron(format!("invalid cron expression: {error}")))?;
        if schedule.upcoming(Tz::UTC).next().is_none() {
            return Err(ScheduleError::Cron("never fires".to_string()));
        }
        Ok(CronSchedule { schedule, zone })
    }

    /// The latest time (Unix ms) at or before `now_ms` and after `now_ms - lookback_ms` at
    /// which the schedule fired, if any.
    pub fn latest_start(&self, now_ms: u64, lookback_ms: u64) -> Option<u64> {
        let earliest = now_ms.saturating_sub(lookback_ms);
        // Widen the search step by step so that a frequent schedule with a long lookback costs
        // a few iterations, not one per firing over the whole lookback.
        for window in [60_000, 3_600_000, 86_400_000, u64::MAX] {
            let from = now_ms.saturating_sub(window).max(earliest);
            let found = self.fired_between(from, now_ms);
            if found.is_some() || from == earliest {
                return found;
            }
        }
        None
    }

    fn fired_between(&self, from_ms: u64, to_ms: u64) -> Option<u64> {
        // `after` is exclusive; start one millisecond earlier so a firing at `from_ms` counts.
        let start = self.at(from_ms.saturating_sub(1))?;
        let mut latest = None;
        for time in self.schedule.after(&start) {
            let ms = u64::try_from(time.timestamp_millis()).ok()?;
            if ms > to_ms {
                break;
            }
            latest = Some(ms);
        }
        latest
    }

    fn at(&self, ms: u64) -> Option<chrono::DateTime<Tz>> {
        self.zone
            .timestamp_millis_opt(i64::try_from(ms).ok()?)
            .single()
    }

    pub fn zone(&self) -> Tz {
        self.zone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(zone: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        let time = zone
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("an unambiguous local time");
        u64::try_from(time.timestamp_millis()).expect("after 1970")
    }

    #[test]
    fn fires_at_local_time_on_both_sides_of_a_dst_change() {
        let paris = Tz::Europe__Paris;
        let schedule = CronSchedule::parse("0 8 * * *", "Europe/Paris").expect("valid");
        // Paris moved to summer time on 2025-03-30 at 02:00.
        for day in [29, 30, 31] {
            let eight = ms(paris, 2025, 3, day, 8, 0);
            assert_eq!(
                schedule.latest_start(eight + 60_000, 3_600_000),
                Some(eight)
            );
            assert_eq!(schedule.latest_start(eight - 1, 3_600_000), None);
        }
        // 08:00 local is 07:00 UTC in winter and 06:00 UTC in summer.
        assert_eq!(
            ms(paris, 2025, 3, 29, 8, 0) - ms(Tz::UTC, 2025, 3, 29, 7, 0),
            0
        );
        assert_eq!(
            ms(paris, 2025, 3, 30, 8, 0) - ms(Tz::UTC, 2025, 3, 30, 6, 0),
            0
        );
    }

    #[test]
    fn a_frequent_schedule_with_a_long_lookback_finds_the_latest_firing() {
        let schedule = CronSchedule::parse("*/5 * * * *", "UTC").expect("valid");
        let noon = ms(Tz::UTC, 2025, 1, 1, 12, 2);
        assert_eq!(
            schedule.latest_start(noon, 7 * 86_400_000),
            Some(ms(Tz::UTC, 2025, 1, 1, 12, 0))
        );
    }

    #[test]
    fn rejects_bad_expressions_and_zones() {
        for expression in [
            "0 8 * *",
            "0 25 * * *",
            "0 8 * * 1-5",
            "x 8 * * *",
            "0 8 31 2 *",
        ] {
            assert!(
                matches!(
                    CronSchedule::parse(expression, "UTC"),
                    Err(ScheduleError::Cron(_))
                ),
                "{expression}"
            );
        }
        assert!(matches!(
            CronSchedule::parse("0 8 * * MON-FRI", "Mars/Olympus"),
            Err(ScheduleError::TimeZone(_))
        ));
        assert!(CronSchedule::parse("30 7 * * MON-FRI", "America/New_York").is_ok());
    }
}
