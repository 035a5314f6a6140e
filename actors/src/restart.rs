//! Restart policy shared by every supervisor: exponential backoff, and an intensity limit
//! beyond which the supervisor gives up and fails itself (escalating to its own supervisor).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    /// At most this many restarts of one child...
    pub max_restarts: usize,
    /// ...within this window; one more and the supervisor escalates.
    pub within: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            within: Duration::from_secs(10),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Recent restarts of one child.
#[derive(Clone, Debug, Default)]
pub struct RestartHistory {
    recent: VecDeque<Instant>,
    pub total: u64,
}

impl RestartHistory {
    /// The delay before the next restart, or `None` when the intensity limit is exceeded.
    pub fn next_delay(&mut self, policy: &RestartPolicy) -> Option<Duration> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.within)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.max_restarts {
            return None;
        }
        let exponent = u32::try_from(self.recent.len()).unwrap_or(u32::MAX).min(16);
        self.recent.push_back(now);
        self.total += 1;
        Some(
            policy
                .backoff_min
                .saturating_mul(1u32 << exponent)
                .min(policy.backoff_max),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_gives_up() {
        let policy = RestartPolicy {
            max_restarts: 3,
            within: Duration::from_secs(60),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(25),
        };
        let mut h = RestartHistory::default();
        assert_eq!(h.next_delay(&policy), Some(Duration::from_millis(10)));
        assert_eq!(h.next_delay(&policy), Some(Duration::from_millis(20)));
        assert_eq!(h.next_delay(&policy), Some(Duration::from_millis(25)));
        assert_eq!(h.next_delay(&policy), None);
        assert_eq!(h.total, 3);
    }
}
