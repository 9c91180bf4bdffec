//! How often to checkpoint, from what saves really cost: the interval that loses the least
//! expected time to failures and to saving (Young 1974; Daly 2006, "A higher order
//! estimate of the optimum checkpoint interval for restart dumps"), re-estimated as the
//! measured costs of recent saves change. Pure: the manager feeds it measurements taken
//! with its clock.

use std::time::Duration;

/// Weight of the newest save in the running estimates (an exponential moving average:
/// a change in cost shows within a few saves, one slow save does not swing it).
const NEWEST_WEIGHT: f64 = 0.3;

/// The interval between the starts of two checkpoints that minimizes the expected time
/// lost, when a checkpoint stalls the job for `cost` and failures come every `mtbf` on
/// average: Daly's estimate `sqrt(2CM) * (1 + sqrt(C/2M)/3 + (C/2M)/9) - C` while
/// `C < 2M` (its first term is Young's `sqrt(2CM)`), else `M`.
///
/// ```
/// use std::time::Duration;
/// let hour = Duration::from_secs(3600);
/// // A 10 s stall and a failure every 24 hours: a checkpoint about every 21 minutes.
/// let interval = cairn::cadence::optimal_interval(Duration::from_secs(10), 24 * hour);
/// assert_eq!(interval.as_secs() / 60, 21);
/// ```
pub fn optimal_interval(cost: Duration, mtbf: Duration) -> Duration {
    let (c, m) = (cost.as_secs_f64(), mtbf.as_secs_f64());
    if c >= 2.0 * m {
        return mtbf;
    }
    let ratio = c / (2.0 * m);
    let interval = (2.0 * c * m).sqrt() * (1.0 + ratio.sqrt() / 3.0 + ratio / 9.0) - c;
    Duration::try_from_secs_f64(interval.max(0.0)).unwrap_or(mtbf)
}

/// Running estimates of what a save costs, and the interval they call for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cadence {
    mtbf: Duration,
    /// Estimated time a save stalls the loop, seconds.
    blocking: Option<f64>,
    /// Estimated time a save takes from its start to its commit, seconds.
    writing: Option<f64>,
}

impl Cadence {
    /// No save measured yet, failures every `mtbf` on average.
    pub fn new(mtbf: Duration) -> Cadence {
        Cadence { mtbf, blocking: None, writing: None }
    }

    /// Records one save: how long it stalled the loop (`blocking`: the snapshot of an
    /// asynchronous save, all of a synchronous one) and how long it took from its start
    /// to its commit (`writing`).
    pub fn record(&mut self, blocking: Duration, writing: Duration) {
        let blend = |old: Option<f64>, new: Duration| {
            Some(old.map_or(new.as_secs_f64(), |old| old + NEWEST_WEIGHT * (new.as_secs_f64() - old)))
        };
        self.blocking = blend(self.blocking, blocking);
        self.writing = blend(self.writing, writing);
    }

    /// The estimated stall and write time of a save, once one is measured.
    pub fn estimates(&self) -> Option<(Duration, Duration)> {
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX);
        Some((secs(self.blocking?), secs(self.writing?)))
    }

    /// The interval to keep between saves: [`optimal_interval`] for the estimated stall,
    /// and never shorter than a save's write time (a save started before the previous
    /// one is written would wait for it, stalling the loop). `None` until a save is
    /// measured: the first save is then due at once.
    pub fn interval(&self) -> Option<Duration> {
        let (blocking, writing) = self.estimates()?;
        Some(optimal_interval(blocking, self.mtbf).max(writing))
    }

    /// The mean time between failures it was made for.
    pub fn mtbf(&self) -> Duration {
        self.mtbf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn matches_daly_and_young_on_worked_values() {
        // C = 60 s, M = 24 h: sqrt(2CM) = 3220 s; Daly adds (1 + 0.0088 + 0.00002) and
        // takes C off.
        let got = optimal_interval(secs(60.0), secs(86_400.0)).as_secs_f64();
        let young = (2.0f64 * 60.0 * 86_400.0).sqrt();
        let r: f64 = 60.0 / (2.0 * 86_400.0);
        assert!((got - (young * (1.0 + r.sqrt() / 3.0 + r / 9.0) - 60.0)).abs() < 1e-6, "{got}");
        assert!((got - young).abs() / young < 0.02, "close to Young's when C << M: {got} vs {young}");
        // A checkpoint as long as twice the MTBF: save every MTBF.
        assert_eq!(optimal_interval(secs(200.0), secs(100.0)), secs(100.0));
        assert_eq!(optimal_interval(Duration::ZERO, secs(100.0)), Duration::ZERO);
    }

    #[test]
    fn the_interval_follows_the_measured_costs() {
        let mut cadence = Cadence::new(secs(3600.0));
        assert_eq!(cadence.interval(), None, "nothing measured: the first save is due at once");
        cadence.record(secs(2.0), secs(5.0));
        assert_eq!(cadence.estimates(), Some((secs(2.0), secs(5.0))));
        assert_eq!(cadence.interval(), Some(optimal_interval(secs(2.0), secs(3600.0))));
        // Saves become slow: the estimate moves toward the new cost, step by step.
        let before = cadence.interval().unwrap();
        cadence.record(secs(20.0), secs(30.0));
        let (blocking, _) = cadence.estimates().unwrap();
        assert!((blocking.as_secs_f64() - (2.0 + 0.3 * 18.0)).abs() < 1e-9);
        assert!(cadence.interval().unwrap() > before);
        // A write longer than the optimum holds the interval up.
        let mut slow_writes = Cadence::new(secs(3600.0));
        slow_writes.record(secs(0.01), secs(900.0));
        assert_eq!(slow_writes.interval(), Some(secs(900.0)));
    }

    proptest! {
        #[test]
        fn the_optimum_grows_with_cost_and_mtbf_and_stays_within_them(
            c in 0.001f64..10_000.0, m in 1.0f64..1e7, k in 1.0f64..10.0,
        ) {
            let t = optimal_interval(secs(c), secs(m)).as_secs_f64();
            prop_assert!(t <= m.max(2.0 * m) + 1e-6);
            prop_assert!(t <= optimal_interval(secs(c), secs(m * k)).as_secs_f64() + 1e-6);
            if c * k < 2.0 * m {
                prop_assert!(t <= optimal_interval(secs(c * k), secs(m)).as_secs_f64() + 1e-6);
            }
            // Within the model (C < 2M) it is never far from Young's first-order estimate.
            if c < 2.0 * m {
                let young = (2.0 * c * m).sqrt();
                prop_assert!(t <= young * 1.5 + 1e-9, "{} vs Young {}", t, young);
            }
        }

        #[test]
        fn estimates_stay_between_the_smallest_and_largest_measured(
            costs in prop::collection::vec((0.0f64..1000.0, 0.0f64..1000.0), 1..20),
        ) {
            let mut cadence = Cadence::new(secs(86_400.0));
            for &(b, w) in &costs {
                cadence.record(secs(b), secs(w));
            }
            let (b, w) = cadence.estimates().unwrap();
            let (lo_b, hi_b) = costs.iter().fold((f64::MAX, 0f64), |(lo, hi), &(b, _)| (lo.min(b), hi.max(b)));
            let (lo_w, hi_w) = costs.iter().fold((f64::MAX, 0f64), |(lo, hi), &(_, w)| (lo.min(w), hi.max(w)));
            prop_assert!(b.as_secs_f64() >= lo_b - 1e-6 && b.as_secs_f64() <= hi_b + 1e-6);
            prop_assert!(w.as_secs_f64() >= lo_w - 1e-6 && w.as_secs_f64() <= hi_w + 1e-6);
            prop_assert!(cadence.interval().unwrap() >= w);
        }
    }
}
