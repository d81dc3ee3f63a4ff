//! Reading `/proc`: per-process CPU time and identity, system CPU counters, memory and load.
//!
//! Each file has a pure parser (`parse_*`, tested on fixtures) and a thin reader. The readers
//! return `None`/errors instead of panicking: `/proc` entries vanish whenever a process exits,
//! so a read racing an exit is normal, not exceptional.

use std::fs;
use std::io;
use std::path::Path;

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// One of `R S D Z T t X I ...`; `Z` (zombie) and `X` (dead) mean the process has exited.
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// User + system CPU time of the process itself, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// CPU time of children the process has waited for, in clock ticks.
    pub cutime: u64,
    pub cstime: u64,
    /// When the process started, in clock ticks since boot. Together with the pid it names a
    /// process uniquely: a reused pid has a later start time.
    pub start_time: u64,
}

impl ProcStat {
    /// True for zombies and dead processes: they have exited and only wait to be reaped.
    pub fn has_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// CPU time of the process and its reaped children, in clock ticks.
    pub fn total_ticks(&self) -> u64 {
        self.utime
            .saturating_add(self.stime)
            .saturating_add(self.cutime)
            .saturating_add(self.cstime)
    }
}

/// Parses one `/proc/PID/stat` line. The command name (field 2) may contain spaces and
/// parentheses, so the fields after it are found from the *last* `)`.
pub fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line.get(..open)?.trim().parse().ok()?;
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // `rest[0]` is field 3 (state); field N is at index N - 3.
    let field = |n: usize| rest.get(n - 3).copied();
    let number = |n: usize| field(n).and_then(|value| value.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        utime: number(14)?,
        stime: number(15)?,
        cutime: field(16)?.parse::<i64>().ok()?.max(0).unsigned_abs(),
        cstime: field(17)?.parse::<i64>().ok()?.max(0).unsigned_abs(),
        start_time: number(22)?,
    })
}

/// Reads `/proc/PID/stat`; `None` when the process does not exist (any more).
pub fn read_proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&text)
}

/// Every process whose process group is `pgid`, zombies included (the caller decides what an
/// exited member means).
pub fn process_group_members(pgid: i32) -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_proc_stat)
        .filter(|stat| stat.pgrp == pgid)
        .collect()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of every time in `/proc/*/stat`.
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|ticks| *ticks > 0)
        // Linux has used 100 on every mainstream architecture for decades.
        .unwrap_or(100)
}

/// Aggregate CPU counters from the first line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent doing nothing (idle + iowait).
    pub idle: u64,
    /// All ticks, idle included.
    pub total: u64,
}

impl CpuTimes {
    /// Fraction of time busy (0.0 to 1.0) between an earlier sample and this one; `None` when
    /// no time passed or the counters went backwards.
    pub fn utilization_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        if total == 0 {
            return None;
        }
        let busy = total.saturating_sub(idle);
        Some(busy as f64 / total as f64)
    }
}

/// Parses the `cpu ` line of `/proc/stat` (user nice system idle iowait irq softirq steal ...).
/// Guest time is already included in user time, so the fields after `steal` are not added.
pub fn parse_cpu_times(proc_stat: &str) -> Option<CpuTimes> {
    let line = proc_stat.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|value| value.parse().ok())
        .collect::<Option<_>>()?;
    let field = |n: usize| values.get(n).copied().unwrap_or(0);
    if values.len() < 4 {
        return None;
    }
    let idle = field(3) + field(4);
    let total = (0..8).map(field).sum();
    Some(CpuTimes { idle, total })
}

/// The number of `cpuN` lines in `/proc/stat`: the CPUs the kernel schedules on.
pub fn parse_cpu_count(proc_stat: &str) -> usize {
    proc_stat
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_digit())
        })
        .count()
}

/// Memory from `/proc/meminfo`, in KiB as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    pub total_kib: u64,
    pub available_kib: u64,
}

pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let value = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<u64>().ok())
    };
    Some(MemInfo {
        total_kib: value("MemTotal")?,
        available_kib: value("MemAvailable")?,
    })
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text
        .split_whitespace()
        .map(|value| value.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Whether the CPU advertises hardware virtualisation (Intel `vmx` or AMD `svm`) in the flags
/// of `/proc/cpuinfo`. Without it `/dev/kvm` may exist but a KVM guest cannot run.
pub fn parse_cpuinfo_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .filter_map(|line| line.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_name() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 3 2 20 0 1 0 987654 1000000 200 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stat = parse_proc_stat(line).expect("parse");
        assert_eq!(stat.pid, 4242);
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.pgrp, 4242);
        assert_eq!(
            (stat.utime, stat.stime, stat.cutime, stat.cstime),
            (250, 75, 3, 2)
        );
        assert_eq!(stat.start_time, 987654);
        assert_eq!(stat.total_ticks(), 330);
        assert!(!stat.has_exited());
    }

    #[test]
    fn zombie_counts_as_exited() {
        let line = "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 55 0 0";
        assert!(parse_proc_stat(line).expect("parse").has_exited());
    }

    #[test]
    fn truncated_stat_is_refused() {
        assert_eq!(parse_proc_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn reads_own_stat() {
        let me = i32::try_from(std::process::id()).expect("pid fits i32");
        let stat = read_proc_stat(me).expect("own stat");
        assert_eq!(stat.pid, me);
        assert!(stat.start_time > 0);
    }

    #[test]
    fn cpu_utilization_from_deltas() {
        let before =
            parse_cpu_times("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("parse");
        let after = parse_cpu_times("cpu  150 0 150 800 100 0 0 0 0 0\n").expect("parse");
        assert_eq!(
            before,
            CpuTimes {
                idle: 800,
                total: 1000
            }
        );
        // 200 ticks passed, 100 of them busy.
        assert_eq!(after.utilization_since(&before), Some(0.5));
        assert_eq!(before.utilization_since(&after), None);
        assert_eq!(before.utilization_since(&before), None);
    }

    #[test]
    fn counts_cpus() {
        assert_eq!(parse_cpu_count("cpu  1 2 3 4\ncpu0 1\ncpu1 1\nintr 5\n"), 2);
    }

    #[test]
    fn parses_meminfo_and_loadavg() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some(MemInfo {
                total_kib: 24_000_000,
                available_kib: 12_000_000
            })
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 1/100 4242\n"),
            Some([0.5, 1.25, 2.0])
        );
        assert_eq!(parse_loadavg("0.5"), None);
    }

    #[test]
    fn detects_virtualization_flags() {
        assert!(parse_cpuinfo_has_virtualization(
            "flags\t\t: fpu vme vmx sse\n"
        ));
        assert!(parse_cpuinfo_has_virtualization("flags : svm\n"));
        assert!(!parse_cpuinfo_has_virtualization(
            "flags\t\t: fpu vme hypervisor\n"
        ));
        assert!(!parse_cpuinfo_has_virtualization(
            "model name : vmx inside a name\n"
        ));
    }
}
