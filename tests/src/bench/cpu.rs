//! CPU time of processes and of the whole machine, read from `/proc` (Linux).

use std::path::Path;
use std::time::{Duration, Instant};

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat` and `/proc/stat` (`USER_HZ`, 100 on every
/// Linux architecture this runs on).
pub const TICKS_PER_SEC: u64 = 100;

/// Fields of `/proc/<pid>/stat` after the command name: state is index 0, ppid 1, utime 11, stime 12.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time a process has used so far, all its threads together; `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let f = stat_fields(pid)?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / TICKS_PER_SEC))
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut kids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            stat_fields(*p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect();
    kids.sort_unstable();
    kids
}

/// CPU time used so far by a set of processes together (those still running).
pub fn group_cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| process_cpu(*p)).sum()
}

/// A reading of the whole machine's CPU counters.
#[derive(Debug, Clone, Copy)]
pub struct MachineSample {
    at: Instant,
    /// Ticks all CPUs spent not idle (user, nice, system, irq, softirq, steal).
    busy_ticks: u64,
    /// Microseconds in which at least one runnable task waited for a CPU (`/proc/pressure/cpu`, "some").
    pressure_us: Option<u64>,
}

/// How busy the machine was between two [`MachineSample`]s.
#[derive(Debug, Clone, Copy)]
pub struct MachineLoad {
    /// Wall time between the samples.
    pub wall: Duration,
    /// CPUs kept busy on average (by every process, this benchmark's included).
    pub busy_cpus: f64,
    /// Share of the time some runnable task waited for a CPU, if the kernel reports pressure.
    pub pressure_some: Option<f64>,
}

impl MachineSample {
    /// Reads the counters now.
    pub fn now() -> Self {
        let busy_ticks = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| {
                let line = t.lines().next()?.to_owned();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal (guest time is already in user).
                let total: u64 = v.iter().take(8).sum();
                Some(total - v.get(3)? - v.get(4)?)
            })
            .unwrap_or(0);
        Self {
            at: Instant::now(),
            busy_ticks,
            pressure_us: pressure_total(Path::new("/proc/pressure/cpu")),
        }
    }

    /// The load between `earlier` and this sample.
    pub fn since(&self, earlier: &MachineSample) -> MachineLoad {
        let wall = self.at.saturating_duration_since(earlier.at);
        let secs = wall.as_secs_f64().max(1e-9);
        let busy = self.busy_ticks.saturating_sub(earlier.busy_ticks) as f64 / TICKS_PER_SEC as f64;
        MachineLoad {
            wall,
            busy_cpus: busy / secs,
            pressure_some: match (earlier.pressure_us, self.pressure_us) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6 / secs),
                _ => None,
            },
        }
    }
}

/// The "some" total of a pressure file, in microseconds.
fn pressure_total(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let some = text.lines().find(|l| l.starts_with("some"))?;
    some.split_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The processor model and count, and the kernel release, in one line.
pub fn machine_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown processor".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cpus} x {model}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_the_machine() {
        let me = std::process::id();
        let before = process_cpu(me).unwrap_or_default();
        let sample = MachineSample::now();
        // Burn CPU until this process's counter and the machine's both move (they count in ticks), for at most
        // five seconds.
        let began = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        let mut load = MachineSample::now().since(&sample);
        while (after <= before || load.busy_cpus <= 0.0) && began.elapsed() < Duration::from_secs(5)
        {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = process_cpu(me).unwrap_or_default();
            load = MachineSample::now().since(&sample);
        }
        assert_ne!(x, 1);
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(load.busy_cpus > 0.0);
        assert!(process_cpu(u32::MAX).is_none());
        assert!(!machine_description().is_empty());
    }
}
