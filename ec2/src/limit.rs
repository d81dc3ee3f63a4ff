//! A token bucket: `burst` tokens, refilled at `rate` per second; every EC2 attempt takes one.
//! Over any window of `t` seconds at most `burst + rate * t` calls start.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    inner: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// `rate` calls per second (at least 0.01), `burst` at least 1. Starts full.
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate.max(0.01),
            burst,
            inner: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
            }),
        }
    }

    /// Waits until a token is free and takes it.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut bucket = match self.inner.lock() {
                    Ok(bucket) => bucket,
                    Err(poisoned) => poisoned.into_inner(),
                };
                match bucket.take(Instant::now(), self.rate, self.burst) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Bucket {
    /// Refills for the time since the last call and takes a token, or says how long until one
    /// is free. Pure in `now`, so the rate is tested without a clock.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_burst_plus_rate_times_time() {
        // Callers that always wait exactly as long as they are told: the fastest possible.
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: 3.0,
            refilled: start,
        };
        let mut now = start;
        let mut starts = Vec::new();
        while starts.len() < 23 {
            match bucket.take(now, 5.0, 3.0) {
                Ok(()) => starts.push(now.duration_since(start).as_secs_f64()),
                Err(wait) => now += wait,
            }
        }
        // 3 at once, then one every 200 ms: the 23rd at 4 s.
        assert!(starts[2] < 1e-6, "{starts:?}");
        assert!((starts[22] - 4.0).abs() < 0.01, "{starts:?}");
        for (count, at) in starts.iter().enumerate() {
            assert!((count + 1) as f64 <= 3.0 + 5.0 * at + 1e-6, "{starts:?}");
        }
    }
}
