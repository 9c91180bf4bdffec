//! When to save and what to keep, as small types and pure functions: no clock, no I/O.
//! The manager feeds them the facts (step, elapsed time, what exists) and acts on the
//! answer, so every rule here is tested with plain tables and property tests.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::{Error, Result};

/// Save every `interval` steps (at multiples of `interval`), up to and including `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    /// Steps between saves.
    pub interval: u64,
    /// Last step this rule applies to; `None` means forever.
    pub until: Option<u64>,
}

impl Every {
    /// Every `interval` steps, forever.
    pub fn new(interval: u64) -> Every {
        Every { interval, until: None }
    }

    /// Every `interval` steps up to and including step `until`.
    pub fn until(interval: u64, until: u64) -> Every {
        Every { interval, until: Some(until) }
    }
}

/// When to save.
///
/// ```
/// use cairn::policy::{Every, SavePolicy};
/// // every 100 steps until 1,000, then every 1,000
/// let policy = SavePolicy::steps(vec![Every::until(100, 1000), Every::new(1000)]).unwrap();
/// ```
///
/// The default, the same in every face: every 500 steps until step 5,000, then every
/// 1,000 ([`DEFAULT_SAVE_RULES`]), no time interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavePolicy {
    steps: Vec<Every>,
    interval: Option<Duration>,
    /// The mean time between failures an automatic interval is chosen for.
    auto: Option<Duration>,
}

/// The step rules of the default [`SavePolicy`].
pub const DEFAULT_SAVE_RULES: [Every; 2] =
    [Every { interval: 500, until: Some(5000) }, Every { interval: 1000, until: None }];

impl Default for SavePolicy {
    fn default() -> Self {
        SavePolicy { steps: DEFAULT_SAVE_RULES.to_vec(), interval: None, auto: None }
    }
}

impl SavePolicy {
    /// A step schedule: rules sorted by `until`, only the last open-ended, intervals > 0.
    pub fn steps(rules: Vec<Every>) -> Result<SavePolicy> {
        for (i, rule) in rules.iter().enumerate() {
            if rule.interval == 0 {
                return Err(Error::invalid(format!("save interval must be positive rule={i}")));
            }
            let last = i + 1 == rules.len();
            match (rule.until, rules.get(i + 1).and_then(|next| next.until)) {
                (None, _) if !last => {
                    return Err(Error::invalid(format!(
                        "only the last save rule may be open-ended rule={i} interval={}",
                        rule.interval
                    )))
                }
                (Some(until), Some(next_until)) if next_until <= until => {
                    return Err(Error::invalid(format!(
                        "save rules must be sorted by `until` rule={} until={next_until} follows until={until}",
                        i + 1
                    )))
                }
                _ => {}
            }
        }
        Ok(SavePolicy { steps: rules, interval: None, auto: None })
    }

    /// Also save a *temporary* checkpoint whenever `interval` has passed since the last save.
    pub fn with_time_interval(mut self, interval: Duration) -> SavePolicy {
        self.interval = Some(interval);
        self
    }

    /// Also save a *temporary* checkpoint whenever the interval chosen from the measured
    /// cost of recent saves and `mtbf`, the mean time between failures, has passed since
    /// the last save (see [`crate::cadence`]); the manager measures the costs.
    pub fn with_auto_interval(mut self, mtbf: Duration) -> SavePolicy {
        self.auto = Some(mtbf);
        self
    }

    /// The mean time between failures of an automatic interval, if one is configured.
    pub fn auto_interval_mtbf(&self) -> Option<Duration> {
        self.auto
    }

    /// Whether a time interval (temporary checkpoints), fixed or automatic, is configured.
    pub fn has_time_interval(&self) -> bool {
        self.interval.is_some() || self.auto.is_some()
    }

    /// The step rule that applies at `step`, if any.
    fn rule_at(&self, step: u64) -> Option<&Every> {
        self.steps.iter().find(|r| r.until.is_none_or(|u| step <= u))
    }
}

/// The facts a save decision depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveContext {
    /// Current step.
    pub step: u64,
    /// Time since the manager started (from its clock).
    pub now: Duration,
    /// Step of the last checkpoint saved or found, if any.
    pub last_step: Option<u64>,
    /// When the last save happened (clock time); the manager's start if none yet.
    pub last_save_at: Duration,
    /// The caller forces a save (e.g. the final step).
    pub force: bool,
    /// A preemption signal arrived.
    pub preempted: bool,
    /// The automatic interval as things stand (see [`crate::cadence::Cadence`]), when the
    /// policy has one: zero while no save has been measured (the first is due at once).
    pub auto_interval: Option<Duration>,
}

/// What to do at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do not save.
    Skip,
    /// Save; a temporary checkpoint is deleted once a newer one is committed.
    Save {
        /// Whether the checkpoint is temporary.
        temporary: bool,
    },
}

/// Decides whether to save at `ctx.step`: forced and preemption saves always happen;
/// otherwise step 0 and an already saved step are skipped; a step rule match saves a
/// permanent checkpoint; an elapsed time interval, fixed or automatic, saves a temporary
/// one.
pub fn should_save(policy: &SavePolicy, ctx: &SaveContext) -> Decision {
    if ctx.force || ctx.preempted {
        return Decision::Save { temporary: false };
    }
    if ctx.step == 0 || ctx.last_step.is_some_and(|last| last >= ctx.step) {
        return Decision::Skip;
    }
    if policy.rule_at(ctx.step).is_some_and(|r| ctx.step % r.interval == 0) {
        return Decision::Save { temporary: false };
    }
    let elapsed = ctx.now.saturating_sub(ctx.last_save_at);
    let due = |interval: Option<Duration>| interval.is_some_and(|interval| elapsed >= interval);
    match due(policy.interval) || (policy.auto.is_some() && due(ctx.auto_interval.or(Some(Duration::ZERO)))) {
        true => Decision::Save { temporary: true },
        false => Decision::Skip,
    }
}

/// Direction of a metric for keep-best retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Lower is better (loss).
    #[default]
    Min,
    /// Higher is better (accuracy).
    Max,
}

impl std::str::FromStr for Mode {
    type Err = Error;

    /// `"min"` or `"max"`.
    fn from_str(text: &str) -> Result<Mode> {
        match text {
            "min" => Ok(Mode::Min),
            "max" => Ok(Mode::Max),
            other => Err(Error::invalid(format!("mode must be \"min\" or \"max\" mode=`{other}`"))),
        }
    }
}

/// Keep the best `count` checkpoints by `metric`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepBest {
    /// How many to keep.
    pub count: usize,
    /// Metric name recorded at save time.
    pub metric: String,
    /// Whether lower or higher is better.
    pub mode: Mode,
}

/// What to keep. Permanent checkpoints are kept if *any* configured rule keeps them (all
/// are kept when no rule is configured); a temporary one is kept only until a newer
/// checkpoint is committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// Keep the last N permanent checkpoints.
    pub keep_last: Option<usize>,
    /// Keep every checkpoint whose step is a multiple of K, forever.
    pub keep_every: Option<u64>,
    /// Keep the best K by a metric.
    pub keep_best: Option<KeepBest>,
}

impl Retention {
    /// The retention of flat options (`keep_last`, `keep_every`, `keep_best` ranked by
    /// `metric` in `mode`), as the CLI's flags give them; keep-best without a metric is
    /// invalid.
    ///
    /// ```
    /// use cairn::policy::{Mode, Retention};
    /// let r = Retention::from_flags(Some(3), None, Some(2), Some("loss".into()), Mode::Min).unwrap();
    /// assert_eq!(r.keep_best.unwrap().count, 2);
    /// assert!(Retention::from_flags(None, None, Some(2), None, Mode::Min).is_err());
    /// ```
    pub fn from_flags(
        keep_last: Option<usize>,
        keep_every: Option<u64>,
        keep_best: Option<usize>,
        metric: Option<String>,
        mode: Mode,
    ) -> Result<Retention> {
        let keep_best = match (keep_best, metric) {
            (Some(count), Some(metric)) => Some(KeepBest { count, metric, mode }),
            (Some(_), None) => return Err(Error::invalid("keep_best needs a metric to rank by")),
            (None, _) => None,
        };
        Ok(Retention { keep_last, keep_every, keep_best })
    }

    /// The metric keep-best ranks by, if any.
    pub fn metric(&self) -> Option<&str> {
        self.keep_best.as_ref().map(|b| b.metric.as_str())
    }
}

/// A committed checkpoint as retention sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Step.
    pub step: u64,
    /// Temporary flag.
    pub temporary: bool,
    /// The keep-best metric, when recorded and numeric.
    pub metric: Option<f64>,
}

impl Candidate {
    /// How retention sees the checkpoint `info`, ranked by `metric` if given.
    pub fn from_info(info: &crate::info::CheckpointInfo, metric: Option<&str>) -> Candidate {
        Candidate { step: info.step, temporary: info.temporary, metric: metric.and_then(|m| info.metric(m)) }
    }
}

/// Steps to delete among `checkpoints`. Never the latest committed step, never a step in
/// `protected` (being read or written), never a permanent one because of a temporary one.
pub fn to_delete(retention: &Retention, checkpoints: &[Candidate], protected: &BTreeSet<u64>) -> Vec<u64> {
    let Some(latest) = checkpoints.iter().map(|c| c.step).max() else { return Vec::new() };
    let mut permanent: Vec<&Candidate> = checkpoints.iter().filter(|c| !c.temporary).collect();
    permanent.sort_by_key(|c| c.step);
    let any_rule = retention.keep_last.is_some() || retention.keep_every.is_some() || retention.keep_best.is_some();

    let mut keep: BTreeSet<u64> = BTreeSet::new();
    if !any_rule {
        keep.extend(permanent.iter().map(|c| c.step));
    }
    if let Some(n) = retention.keep_last {
        keep.extend(permanent.iter().rev().take(n).map(|c| c.step));
    }
    if let Some(k) = retention.keep_every.filter(|&k| k > 0) {
        keep.extend(permanent.iter().filter(|c| c.step % k == 0).map(|c| c.step));
    }
    if let Some(best) = &retention.keep_best {
        let mut scored: Vec<(f64, u64)> =
            permanent.iter().filter_map(|c| c.metric.filter(|m| !m.is_nan()).map(|m| (m, c.step))).collect();
        scored.sort_by(|a, b| {
            let order = a.0.total_cmp(&b.0);
            let order = if best.mode == Mode::Max { order.reverse() } else { order };
            order.then(b.1.cmp(&a.1))
        });
        keep.extend(scored.iter().take(best.count).map(|&(_, step)| step));
    }

    let mut delete: Vec<u64> = checkpoints
        .iter()
        .filter(|c| c.step != latest && !protected.contains(&c.step))
        .filter(|c| if c.temporary { c.step < latest } else { !keep.contains(&c.step) })
        .map(|c| c.step)
        .collect();
    delete.sort_unstable();
    delete.dedup();
    delete
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(step: u64) -> SaveContext {
        SaveContext { step, ..Default::default() }
    }

    #[test]
    fn step_schedule_over_3000_steps() {
        let policy = SavePolicy::steps(vec![Every::until(100, 1000), Every::new(1000)]).unwrap();
        let mut last = None;
        let mut saved = Vec::new();
        for step in 0..=3000 {
            let decision = should_save(&policy, &SaveContext { last_step: last, ..ctx(step) });
            if decision == (Decision::Save { temporary: false }) {
                saved.push(step);
                last = Some(step);
            }
        }
        let expected: Vec<u64> = (1..=10).map(|i| i * 100).chain([2000, 3000]).collect();
        assert_eq!(saved, expected);
    }

    #[test]
    fn unsorted_or_open_ended_rules_are_refused() {
        let err = SavePolicy::steps(vec![Every::new(10), Every::until(5, 100)]).unwrap_err();
        assert!(err.to_string().contains("open-ended"), "{err}");
        let err = SavePolicy::steps(vec![Every::until(10, 500), Every::until(5, 100)]).unwrap_err();
        assert!(err.to_string().contains("sorted"), "{err}");
        assert!(SavePolicy::steps(vec![Every::new(0)]).is_err());
    }

    #[test]
    fn step_zero_is_skipped_unless_forced() {
        let policy = SavePolicy::steps(vec![Every::new(10)]).unwrap();
        assert_eq!(should_save(&policy, &ctx(0)), Decision::Skip);
        assert_eq!(should_save(&policy, &SaveContext { force: true, ..ctx(0) }), Decision::Save { temporary: false });
    }

    #[test]
    fn same_step_is_not_saved_twice_unless_forced() {
        let policy = SavePolicy::steps(vec![Every::new(10)]).unwrap();
        let again = SaveContext { last_step: Some(10), ..ctx(10) };
        assert_eq!(should_save(&policy, &again), Decision::Skip);
        assert_eq!(should_save(&policy, &SaveContext { force: true, ..again }), Decision::Save { temporary: false });
    }

    #[test]
    fn preemption_saves_regardless_of_policy() {
        let policy = SavePolicy::steps(vec![Every::new(1000)]).unwrap();
        assert_eq!(
            should_save(&policy, &SaveContext { preempted: true, ..ctx(7) }),
            Decision::Save { temporary: false }
        );
    }

    #[test]
    fn an_automatic_interval_saves_at_once_then_as_the_measured_costs_say() {
        let policy = SavePolicy::steps(vec![Every::new(1000)]).unwrap().with_auto_interval(Duration::from_secs(3600));
        assert!(policy.has_time_interval());
        let at = |step, secs, auto_interval| SaveContext {
            now: Duration::from_secs(secs),
            last_save_at: Duration::from_secs(100),
            last_step: Some(1),
            auto_interval,
            ..ctx(step)
        };
        let temporary = Decision::Save { temporary: true };
        assert_eq!(should_save(&policy, &at(2, 100, None)), temporary, "nothing measured: due at once");
        assert_eq!(should_save(&policy, &at(2, 105, Some(Duration::from_secs(10)))), Decision::Skip);
        assert_eq!(should_save(&policy, &at(3, 110, Some(Duration::from_secs(10)))), temporary);
        assert_eq!(should_save(&policy, &at(1000, 101, Some(Duration::MAX))), Decision::Save { temporary: false });
        let plain = SavePolicy::steps(vec![Every::new(1000)]).unwrap();
        assert_eq!(should_save(&plain, &at(2, 100, None)), Decision::Skip, "no automatic interval configured");
    }

    #[test]
    fn time_interval_makes_temporaries_with_a_fake_clock() {
        let policy = SavePolicy::steps(vec![Every::new(1000)]).unwrap().with_time_interval(Duration::from_secs(60));
        let mut last_save_at = Duration::ZERO;
        let mut temporaries = Vec::new();
        // One step every 7 seconds of fake time, for 300 steps.
        for step in 1..=300u64 {
            let now = Duration::from_secs(step * 7);
            let d = should_save(&policy, &SaveContext { now, last_save_at, ..ctx(step) });
            if let Decision::Save { temporary } = d {
                assert!(temporary, "step {step}");
                temporaries.push(step);
                last_save_at = now;
            }
        }
        assert_eq!(temporaries.first(), Some(&9)); // 63 s
        assert_eq!(temporaries.len(), 300 / 9);
        assert!(temporaries.windows(2).all(|w| w[1] - w[0] == 9));
    }

    #[test]
    fn the_default_policy_saves_every_500_steps_until_5000_then_every_1000() {
        let policy = SavePolicy::default();
        let saved: Vec<u64> = (0..=8000).filter(|&s| should_save(&policy, &ctx(s)) != Decision::Skip).collect();
        let expected: Vec<u64> = (1..=10).map(|i| i * 500).chain([6000, 7000, 8000]).collect();
        assert_eq!(saved, expected);
    }

    fn perm(step: u64, metric: f64) -> Candidate {
        Candidate { step, temporary: false, metric: Some(metric) }
    }

    #[test]
    fn keep_last_keeps_the_newest_permanent_ones() {
        let cps: Vec<Candidate> = (1..=5).map(|s| perm(s * 10, 0.0)).collect();
        let r = Retention { keep_last: Some(2), ..Default::default() };
        assert_eq!(to_delete(&r, &cps, &BTreeSet::new()), vec![10, 20, 30]);
    }

    #[test]
    fn keep_every_and_keep_best_are_unioned_with_keep_last() {
        let cps: Vec<Candidate> = vec![perm(100, 0.9), perm(200, 0.1), perm(300, 0.5), perm(400, 0.7), perm(500, 0.8)];
        let r = Retention {
            keep_last: Some(1),
            keep_every: Some(400),
            keep_best: Some(KeepBest { count: 1, metric: "loss".into(), mode: Mode::Min }),
        };
        assert_eq!(to_delete(&r, &cps, &BTreeSet::new()), vec![100, 300]);
        let r = Retention {
            keep_best: Some(KeepBest { count: 2, metric: "acc".into(), mode: Mode::Max }),
            ..Default::default()
        };
        assert_eq!(to_delete(&r, &cps, &BTreeSet::new()), vec![200, 300, 400]);
    }

    #[test]
    fn temporaries_go_once_superseded_and_never_push_out_permanent_ones() {
        let cps = vec![
            perm(100, 0.0),
            Candidate { step: 150, temporary: true, metric: None },
            perm(200, 0.0),
            Candidate { step: 250, temporary: true, metric: None },
        ];
        let r = Retention { keep_last: Some(2), ..Default::default() };
        assert_eq!(to_delete(&r, &cps, &BTreeSet::new()), vec![150]);
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::btree_map(0u64..200, (any::<bool>(), prop::option::of(-10.0f64..10.0)), 0..30).prop_map(|m| {
            m.into_iter().map(|(step, (temporary, metric))| Candidate { step, temporary, metric }).collect()
        })
    }

    fn retention() -> impl Strategy<Value = Retention> {
        (prop::option::of(0usize..5), prop::option::of(0u64..50), prop::option::of((0usize..4, any::<bool>())))
            .prop_map(|(keep_last, keep_every, best)| Retention {
                keep_last,
                keep_every,
                keep_best: best.map(|(count, max)| KeepBest {
                    count,
                    metric: "m".into(),
                    mode: if max { Mode::Max } else { Mode::Min },
                }),
            })
    }

    proptest! {
        #[test]
        fn retention_never_removes_the_latest_or_a_protected_checkpoint(
            cps in candidates(), r in retention(), pinned in prop::collection::btree_set(0u64..200, 0..5)
        ) {
            let deleted = to_delete(&r, &cps, &pinned);
            if let Some(latest) = cps.iter().map(|c| c.step).max() {
                prop_assert!(!deleted.contains(&latest));
            }
            for step in &deleted {
                prop_assert!(!pinned.contains(step));
                prop_assert!(cps.iter().any(|c| c.step == *step));
            }
        }

        #[test]
        fn temporaries_never_cause_permanent_deletions(cps in candidates(), r in retention()) {
            let permanent_only: Vec<Candidate> = cps.iter().filter(|c| !c.temporary).cloned().collect();
            let with = to_delete(&r, &cps, &BTreeSet::new());
            let without = to_delete(&r, &permanent_only, &BTreeSet::new());
            for step in with.iter().filter(|s| permanent_only.iter().any(|c| c.step == **s)) {
                // A permanent deletion must also happen with the temporaries removed,
                // unless it was only protected there by being the latest.
                let latest_without = permanent_only.iter().map(|c| c.step).max();
                prop_assert!(without.contains(step) || latest_without == Some(*step));
            }
        }
    }
}
