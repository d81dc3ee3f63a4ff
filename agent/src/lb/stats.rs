//! `show stat` CSV (management guide 9.1) into [`LbStats`].
//!
//! Which columns HAProxy 2.6 fills for which line (the `[LFBS]` marks of 9.1):
//! - `scur`, `smax`, `stot`, `rate`, `hrsp_5xx`, `qcur`, `rtime`: backends and servers.
//! - `req_tot`: frontends and backends only, not servers. A server's requests are counted by
//!   `stot`: in http mode each request is its own stream, which counts as one session of the
//!   server it is sent to.
//! - `req_rate`: frontends only, so a backend's and a server's request rate is `rate`
//!   (streams per second over the last second), requests in http mode, sessions in tcp mode.
//!
//! Columns are found by the header's names, not positions, so a later HAProxy that adds
//! columns reads the same.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strata_api::LbStats;

/// One line of `show stat`, by column name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatRow {
    pub proxy: String,
    /// `FRONTEND`, `BACKEND` or the server's name.
    pub service: String,
    fields: BTreeMap<String, String>,
}

impl StatRow {
    pub fn get(&self, column: &str) -> Option<&str> {
        self.fields.get(column).map(String::as_str)
    }

    fn number(&self, column: &str) -> u64 {
        self.get(column)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    }

    /// HAProxy's status column: `UP`, `DOWN`, `DRAIN`, `MAINT`, `UP 1/3`, `no check`, ...
    pub fn status(&self) -> &str {
        self.get("status").unwrap_or("")
    }

    /// The figures of a server or backend line. `http`: count requests (`req_tot` on a
    /// backend) rather than sessions.
    pub fn stats(&self, http: bool) -> LbStats {
        let total = if http && self.service == "BACKEND" {
            self.number("req_tot")
        } else {
            self.number("stot")
        };
        LbStats {
            request_rate: self.number("rate") as f64,
            sessions: self.number("scur"),
            max_sessions: self.number("smax"),
            queue: self.number("qcur"),
            response_time_ms: self.number("rtime") as f64,
            http_5xx: self.number("hrsp_5xx"),
            total,
        }
    }
}

/// Per-second rates from HAProxy's counters (`req_tot`, `stot`), as deltas between two
/// reports. The counters start from zero in every new worker, so they go down after a
/// reload or a restart: a counter lower than its baseline is a reset, which starts a new
/// baseline (no rate is derived across it; the caller falls back to HAProxy's own
/// last-second `rate` for that one report, as for a key seen the first time).
///
/// A rate is measured over at least `MIN_RATE_SPAN`. An LB agent long-polls and the leader
/// answers at every pool change, so during a scale-out reports can follow each other within
/// milliseconds: a delta over 20 ms holds zero or one request, which reads as 0 or 50 per
/// second, and the autoscaler's mean over its window took such readings at face value (35
/// requests/s read as 42 and scaled one instance too far). A report that comes sooner
/// repeats the last rate and keeps the baseline.
#[derive(Debug)]
pub struct Rates<K> {
    baselines: BTreeMap<K, Baseline>,
}

/// Where the current measurement started, and the last rate measured.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    at: Instant,
    counter: u64,
    last: Option<f64>,
}

/// The shortest span a rate is measured over.
pub const MIN_RATE_SPAN: Duration = Duration::from_millis(500);

impl<K> Default for Rates<K> {
    fn default() -> Self {
        Rates {
            baselines: BTreeMap::new(),
        }
    }
}

impl<K: Ord> Rates<K> {
    /// The rate of `counter` per second since the baseline of `key`; `None` for a first
    /// sample or a reset (either starts a new baseline), and for a sample sooner than
    /// `MIN_RATE_SPAN` after a baseline that has no rate yet. A sample at least
    /// `MIN_RATE_SPAN` after the baseline becomes the new baseline.
    pub fn sample(&mut self, key: K, at: Instant, counter: u64) -> Option<f64> {
        let fresh = Baseline {
            at,
            counter,
            last: None,
        };
        let Some(baseline) = self.baselines.get_mut(&key) else {
            self.baselines.insert(key, fresh);
            return None;
        };
        if counter < baseline.counter {
            *baseline = fresh;
            return None;
        }
        let elapsed = at.checked_duration_since(baseline.at)?;
        if elapsed < MIN_RATE_SPAN {
            return baseline.last;
        }
        let rate = (counter - baseline.counter) as f64 / elapsed.as_secs_f64();
        *baseline = Baseline {
            at,
            counter,
            last: Some(rate),
        };
        Some(rate)
    }

    /// Forgets the keys `keep` refuses (servers and tiers no longer served).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.baselines.retain(|key, _| keep(key));
    }
}

/// Splits one CSV line; a field may be quoted with `"`, a quote inside doubled (9.1).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Parses the whole answer of `show stat`; lines it cannot read are skipped.
pub fn parse_show_stat(text: &str) -> Vec<StatRow> {
    let mut lines = text.lines();
    let Some(header) = lines.find_map(|line| line.strip_prefix("# ")) else {
        return Vec::new();
    };
    let columns = split_csv(header);
    lines
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let values = split_csv(line);
            let mut fields = BTreeMap::new();
            for (column, value) in columns.iter().zip(values) {
                if !value.is_empty() {
                    fields.insert(column.clone(), value);
                }
            }
            Some(StatRow {
                proxy: fields.get("pxname")?.clone(),
                service: fields.get("svname")?.clone(),
                fields,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_come_from_counter_deltas_and_a_reset_starts_a_new_baseline() {
        use std::time::Duration;
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rates = Rates::default();
        assert_eq!(rates.sample("web", at(0), 100), None, "first sample");
        assert_eq!(rates.sample("web", at(1000), 150), Some(50.0));
        assert_eq!(rates.sample("web", at(1500), 150), Some(0.0));
        // A reload: the new worker counts from zero.
        assert_eq!(rates.sample("web", at(2500), 20), None, "a reset");
        assert_eq!(
            rates.sample("web", at(3500), 60),
            Some(40.0),
            "from the new baseline"
        );
        assert_eq!(
            rates.sample("web", at(3500), 70),
            Some(40.0),
            "no time elapsed"
        );
        rates.retain(|key| *key != "web");
        assert_eq!(rates.sample("web", at(4500), 80), None, "forgotten");
    }

    #[test]
    fn reports_in_quick_succession_do_not_read_a_few_requests_as_a_rate() {
        use std::time::Duration;
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rates = Rates::default();
        // 35 requests/s; reports at 0, 1000, then a burst of pool changes at 1010, 1030, 1050.
        assert_eq!(rates.sample("web", at(0), 0), None);
        assert_eq!(rates.sample("web", at(1000), 35), Some(35.0));
        assert_eq!(rates.sample("web", at(1010), 36), Some(35.0), "not 100/s");
        assert_eq!(rates.sample("web", at(1030), 36), Some(35.0), "not 0/s");
        assert_eq!(rates.sample("web", at(1050), 37), Some(35.0));
        // The next full span is measured from the baseline at 1000.
        assert_eq!(rates.sample("web", at(2000), 70), Some(35.0));
        // A short first span has no rate to repeat: HAProxy's own `rate` stands in.
        assert_eq!(rates.sample("api", at(0), 0), None);
        assert_eq!(rates.sample("api", at(100), 4), None);
        assert_eq!(rates.sample("api", at(500), 20), Some(40.0));
    }

    use super::*;

    /// Lines as HAProxy 2.6.12 prints them (cut after `rtime`'s neighbours).
    const SAMPLE: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime\n\
fe_web,FRONTEND,,,3,9,9979,120,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,7,0,12,,,,0,118,0,0,2,0,,7,12,120,,,0,0,0,0,,,,,,,\n\
be_web,s1,1,2,2,5,,60,0,0,,0,,0,0,0,0,UP,100,1,0,0,0,4,0,,1,3,1,,60,,2,4,,6,L7OK,200,1,0,59,0,0,1,0,0,,,,0,0,,,,,0,\"Layer7, check passed\",,0,0,12,13\n\
be_web,s2,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,100,1,0,0,0,4,4,,1,3,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0\n\
be_web,BACKEND,4,4,2,5,998,60,0,0,0,0,,0,0,0,0,UP,100,1,0,,0,4,0,,1,3,0,,60,,1,4,,6,,,,0,58,0,0,2,0,,,,61,0,0,0,0,0,0,0,,,0,0,12,13\n\n";

    #[test]
    fn server_and_backend_lines_read_their_own_columns() {
        let rows = parse_show_stat(SAMPLE);
        assert_eq!(rows.len(), 4);
        let s1 = &rows[1];
        assert_eq!((s1.proxy.as_str(), s1.service.as_str()), ("be_web", "s1"));
        assert_eq!(s1.status(), "UP");
        assert_eq!(s1.get("last_chk"), Some("Layer7, check passed"));
        assert_eq!(
            s1.stats(true),
            LbStats {
                request_rate: 4.0,
                sessions: 2,
                max_sessions: 5,
                queue: 1,
                response_time_ms: 12.0,
                http_5xx: 1,
                total: 60,
            }
        );
        assert_eq!(rows[2].status(), "MAINT");
        let backend = rows[3].stats(true);
        assert_eq!((backend.total, backend.queue, backend.http_5xx), (61, 4, 2));
        // tcp counts sessions.
        assert_eq!(rows[3].stats(false).total, 60);
    }

    #[test]
    fn quoted_fields_keep_their_commas_and_quotes() {
        assert_eq!(
            split_csv("a,\"b, c\",\"say \"\"hi\"\"\",,d"),
            ["a", "b, c", "say \"hi\"", "", "d"]
        );
    }
}
