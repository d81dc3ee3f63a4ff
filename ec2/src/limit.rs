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
                let now = Instant::now();
                let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
                bucket.refilled = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_burst_plus_rate_times_time() {
        let bucket = TokenBucket::new(5.0, 3);
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..23 {
            bucket.acquire().await;
            starts.push(start.elapsed().as_secs_f64());
        }
        // 3 at once, then one every 200 ms: the 23rd at 4 s.
        assert!(starts[2] < 1e-6, "{starts:?}");
        assert!((starts[22] - 4.0).abs() < 0.01, "{starts:?}");
        for (count, at) in starts.iter().enumerate() {
            assert!((count + 1) as f64 <= 3.0 + 5.0 * at + 1e-6, "{starts:?}");
        }
    }
}
