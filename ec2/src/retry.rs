//! What is retried and how long to wait: exponential backoff with full jitter (a delay drawn
//! uniformly from zero to `min(cap, base * 2^attempt)`), as in the AWS Architecture Blog's
//! "Exponential Backoff And Jitter", which the SDK's standard retry mode also follows.

use std::time::Duration;

use rand::Rng;

/// An EC2 call that failed, by what the caller may do about it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Ec2Error {
    /// Throttled (`RequestLimitExceeded`, `Throttling`, HTTP 429): not executed.
    #[error("throttled: {code}: {message}")]
    Throttled { code: String, message: String },
    /// The connection was refused or could not be made: not executed.
    #[error("endpoint unreachable: {0}")]
    Unreachable(String),
    /// A 5xx answer: EC2 says such requests may or may not have run.
    #[error("server error {status}: {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    /// Sent, but no answer (dropped connection, timeout, unreadable response).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// Refused for a reason repeating will not change (bad parameter, credentials).
    #[error("rejected: {code}: {message}")]
    Rejected { code: String, message: String },
}

/// What a retry may assume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Surely not executed: retry.
    NotSent,
    /// Throttled: retry after backing off.
    Throttled,
    /// May have executed: retry only what is safe to repeat.
    Unknown,
    /// Do not retry.
    Final,
}

impl Ec2Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Ec2Error::Throttled { .. } => ErrorClass::Throttled,
            Ec2Error::Unreachable(_) => ErrorClass::NotSent,
            // 503 Unavailable is EC2's "try again"; like every 5xx it may follow execution.
            Ec2Error::Server { .. } | Ec2Error::Unknown(_) => ErrorClass::Unknown,
            Ec2Error::Rejected { .. } => ErrorClass::Final,
        }
    }

    /// A short CamelCase name for events.
    pub fn kind(&self) -> &'static str {
        match self {
            Ec2Error::Throttled { .. } => "Throttled",
            Ec2Error::Unreachable(_) => "Unreachable",
            Ec2Error::Server { .. } => "ServerError",
            Ec2Error::Unknown(_) => "OutcomeUnknown",
            Ec2Error::Rejected { .. } => "Rejected",
        }
    }
}

/// Classifies an error answer by its HTTP status and EC2 error code
/// (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html).
pub fn classify_service(status: u16, code: String, message: String) -> Ec2Error {
    const THROTTLING: &[&str] = &[
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
    ];
    if status == 429 || THROTTLING.contains(&code.as_str()) {
        Ec2Error::Throttled { code, message }
    } else if status >= 500 || code == "InternalError" || code == "Unavailable" {
        Ec2Error::Server {
            status,
            code,
            message,
        }
    } else {
        Ec2Error::Rejected { code, message }
    }
}

/// Full-jitter exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait after the `attempt`-th failure (1-based): uniform in `[0, min(cap, base·2^(attempt-1))]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.cap);
        Duration::from_secs_f64(rng.gen_range(0.0..=ceiling.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_stay_under_the_exponential_ceiling_and_the_cap() {
        let backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..12 {
            let ceiling = (0.1 * f64::from(1u32 << (attempt - 1))).min(5.0);
            let delays: Vec<f64> = (0..200)
                .map(|_| backoff.delay(attempt, &mut rng).as_secs_f64())
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling + 1e-9));
            // Full jitter: spread over the whole range, not bunched at the ceiling.
            assert!(delays.iter().any(|d| *d < ceiling / 4.0));
        }
    }

    #[test]
    fn throttling_and_server_errors_are_told_apart() {
        let class =
            |status, code: &str| classify_service(status, code.into(), String::new()).class();
        assert_eq!(class(400, "RequestLimitExceeded"), ErrorClass::Throttled);
        assert_eq!(class(503, "Unavailable"), ErrorClass::Unknown);
        assert_eq!(class(500, "InternalError"), ErrorClass::Unknown);
        assert_eq!(class(400, "InvalidAMIID.Malformed"), ErrorClass::Final);
        assert_eq!(class(401, "AuthFailure"), ErrorClass::Final);
    }
}
