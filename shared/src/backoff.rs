//! The one backoff policy of every retry loop: MongoDB calls that Cosmos DB throttles
//! ([`crate::mongo::RetryPolicy`]), Key Vault reads until the secret loads ([`crate::keyvault`])
//! and the store slot's reconnects ([`crate::slot`]).
//!
//! Not a crate (backon, backoff): they drive the loop themselves from an iterator of delays, while
//! the MongoDB decision is a pure function of (failure, retries made, time passed) that honours
//! Cosmos DB's `RetryAfterMs` within one deadline over attempts and sleeps, and the slot's sleep is
//! cut short by a rotated connection string. Through backon (`when` + `adjust` + a deadline kept
//! beside it + a `select!` around the whole retry) each loop got longer, for one line saved here.

use std::time::Duration;

/// Exponential backoff: retry `n` (from 0) waits `initial * 2^n`, at most `max`.
///
/// With jitter each wait is drawn uniformly from [half, all] of that ("equal jitter"): callers that
/// failed together (requests throttled in one burst, replicas starting against one vault or
/// reconnecting after a failover) spread their retries instead of arriving in lockstep, while the
/// waits still grow and never exceed `max`. Tests that assert exact waits leave it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: bool,
}

impl Backoff {
    /// Without jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: false,
        }
    }

    pub const fn with_jitter(self) -> Self {
        Self { jitter: true, ..self }
    }

    /// The wait before retry `n` (0 for the first retry).
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(n.min(31)))
            .min(self.max);
        if self.jitter {
            exp.mul_f64(rand::random_range(0.5..=1.0))
        } else {
            exp
        }
    }

    /// The waits before retries 0, 1, 2, … without end.
    pub fn delays(self) -> impl Iterator<Item = Duration> {
        std::iter::successors(Some(0u32), |n| Some(n.saturating_add(1))).map(move |n| self.delay(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_jitter_stays_within_half_to_all() {
        let ms = Duration::from_millis;
        let plain = Backoff::new(ms(200), ms(5_000));
        let waits: Vec<_> = plain.delays().take(7).collect();
        assert_eq!(waits, [200, 400, 800, 1_600, 3_200, 5_000, 5_000].map(ms));
        assert_eq!(plain.delay(u32::MAX), ms(5_000));
        for (n, wait) in plain.with_jitter().delays().take(200).enumerate() {
            let full = plain.delay(n as u32);
            assert!(wait >= full / 2 && wait <= full, "retry {n}: {wait:?} of {full:?}");
        }
    }
}
