//! A closed-loop load generator: N callers, each sending its next request as soon as the previous one is
//! answered, until a request count or a time limit is reached; latencies of every answered request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How much load one measurement applies.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Callers running at once.
    pub concurrency: usize,
    /// Requests sent at most.
    pub max_requests: u64,
    /// Time after which no caller sends another request.
    pub duration: Duration,
}

/// What one measurement observed.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Requests answered as expected.
    pub ok: u64,
    /// Requests that failed or were answered wrongly.
    pub errors: u64,
    /// The first failure, described.
    pub first_error: Option<String>,
    /// From the first request sent to the last answer received.
    pub elapsed: Duration,
    /// Latency of every request answered as expected, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Outcome {
    /// Requests answered as expected per second of wall time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency below which `q` (0..=1) of the answered requests fall, in microseconds (nearest rank).
    pub fn percentile_us(&self, q: f64) -> Option<u32> {
        let n = self.latencies_us.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies_us[rank - 1])
    }
}

/// Runs `call` in a closed loop with `load.concurrency` callers. Caller `i` uses `clients[i % clients.len()]`;
/// each request gets a sequence number, unique within this run, starting at `first_seq`. Every caller sends at
/// least one request (while the count allows), even one that starts after the time limit.
///
/// `call` answers `Ok(())` when the request was answered as expected, or a description of what went wrong.
pub async fn closed_loop<C, F, Fut>(clients: &[C], load: Load, first_seq: u64, call: F) -> Outcome
where
    C: Clone + Send + 'static,
    F: Fn(C, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    if clients.is_empty() || load.concurrency == 0 {
        return Outcome::default();
    }
    let call = Arc::new(call);
    let issued = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let stop_at = began + load.duration;
    let mut tasks = Vec::with_capacity(load.concurrency);
    for i in 0..load.concurrency {
        let client = clients[i % clients.len()].clone();
        let call = call.clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Outcome::default();
            let mut first = true;
            loop {
                // A caller started late (a busy machine) still sends one request.
                if !first && Instant::now() >= stop_at {
                    break;
                }
                first = false;
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= load.max_requests {
                    break;
                }
                let sent = Instant::now();
                let result = call(client.clone(), first_seq + n).await;
                let took = sent.elapsed();
                match result {
                    Ok(()) => {
                        mine.ok += 1;
                        mine.latencies_us
                            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(e) => {
                        mine.errors += 1;
                        mine.first_error.get_or_insert(e);
                    }
                }
            }
            mine
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(mine) => {
                all.ok += mine.ok;
                all.errors += mine.errors;
                if all.first_error.is_none() {
                    all.first_error = mine.first_error;
                }
                all.latencies_us.extend(mine.latencies_us);
            }
            Err(e) => {
                all.errors += 1;
                all.first_error
                    .get_or_insert_with(|| format!("a caller task failed: {e}"));
            }
        }
    }
    all.elapsed = began.elapsed();
    all.latencies_us.sort_unstable();
    all
}

/// Sequence numbers a [`closed_loop`] run with `load` may hand out: `first_seq` up to this much more.
pub fn seq_span(load: Load) -> u64 {
    load.max_requests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_at_the_request_count_and_counts_failures() {
        let load = Load {
            concurrency: 4,
            max_requests: 100,
            duration: Duration::from_secs(60),
        };
        let out = closed_loop(&[()], load, 1000, |(), n| async move {
            if n % 10 == 0 {
                Err(format!("request {n} refused"))
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(out.ok + out.errors, 100);
        assert_eq!(out.errors, 10);
        assert!(out.first_error.is_some_and(|e| e.ends_with("refused")));
        assert_eq!(out.latencies_us.len(), 90);
    }

    #[tokio::test]
    async fn stops_at_the_time_limit() {
        let load = Load {
            concurrency: 2,
            max_requests: u64::MAX / 2,
            duration: Duration::from_millis(50),
        };
        let out = closed_loop(&[()], load, 0, |(), _| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        })
        .await;
        assert!(out.ok >= 2 && out.ok < 100, "{} requests", out.ok);
        assert!(out.elapsed >= Duration::from_millis(50));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let out = Outcome {
            ok: 100,
            latencies_us: (1..=100).collect(),
            elapsed: Duration::from_secs(2),
            ..Outcome::default()
        };
        assert_eq!(out.percentile_us(0.5), Some(50));
        assert_eq!(out.percentile_us(0.99), Some(99));
        assert_eq!(out.percentile_us(1.0), Some(100));
        assert!((out.throughput() - 50.0).abs() < 1e-9);
        assert_eq!(Outcome::default().percentile_us(0.5), None);
    }
}
