//! The training job as a state machine: events and `now` in, actions out.
//! Pure: no sockets, no clocks of its own. The driver in [`super::job`]
//! carries each action out and reports what happened.
//!
//! A job runs steps `1..=total`. Every step sends a batch forward, waits
//! for the logits (the driver computes the loss and sends the gradient
//! back), then waits for the first stage to acknowledge its backward pass.
//! Every `checkpoint_every` steps, and after the last, every stage's state
//! goes to the owner. When a hop fails the machine bans the peers the
//! driver blamed, asks for a new run of the job (new rings, the lost
//! stages on new hosts) restored to the last checkpoint, and replays from
//! there: the arithmetic is that of an uninterrupted run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Choose a route that avoids `avoid`, set up both rings, and bring
    /// every stage to the checkpoint after `restore` steps (`None`: the
    /// slots are new and already at step 0). Then report `Ready`.
    Setup {
        restore: Option<u64>,
        avoid: Vec<PeerId>,
    },
    /// Send step `step`'s batch into the forward ring.
    SendForward { step: u64 },
    /// Receive step `step`'s logits, compute the loss, send the gradient
    /// into the backward ring; report `Output`.
    AwaitOutput { step: u64 },
    /// Receive the first stage's acknowledgement of `step`; report `Acked`.
    AwaitAck { step: u64 },
    /// Collect every stage's state after `step` steps and write it beside
    /// the model map; report `Checkpointed`.
    Checkpoint { step: u64 },
    /// Probe the hops of the current rings and report `Failed` with the
    /// ones that do not answer (a wait timed out).
    Probe,
    /// Evaluate on the test split; report `Evaluated`.
    Evaluate,
    /// Final reports from every host, the map marked complete. The end.
    Finish,
    /// Stopped on request after the checkpoint of `step`. The end.
    Stop { step: u64 },
    /// Gave up. The end.
    Abort { reason: String },
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ready,
    Output {
        step: u64,
    },
    Acked {
        step: u64,
    },
    Checkpointed {
        step: u64,
    },
    Evaluated,
    /// A hop failed; `blamed` are the peers the driver holds responsible
    /// (possibly none).
    Failed {
        blamed: Vec<PeerId>,
        reason: String,
    },
    /// The user asked to stop (Ctrl-C).
    Interrupt,
}

/// How a job is laid out in steps.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Steps the finished job has applied (all epochs).
    pub total_steps: u64,
    /// A checkpoint every this many steps; `None` chooses it so that
    /// checkpoints cost about [`CHECKPOINT_BUDGET`] of the training time.
    pub checkpoint_every: Option<u64>,
    /// With an automatic interval: what one checkpoint is expected to
    /// cost, in steps' time, before one has been measured
    /// ([`crate::client::plan::checkpoint_cost_in_steps`]). A job whose
    /// budget, by the estimate, has room for the final checkpoint alone
    /// takes only that one; any other takes its first after
    /// [`FIRST_CHECKPOINT`] steps, whose measured cost then spaces the
    /// rest.
    pub checkpoint_estimate: Option<f64>,
    /// Send the next batch while the hosts run the backward pass.
    pub pipeline: bool,
    /// Failovers allowed before the job gives up.
    pub max_failovers: u32,
    /// Longest wait for one reply.
    pub step_timeout: Duration,
}

/// The share of a job's time its checkpoints may take when the interval is
/// chosen automatically (a little under 5%: costs vary).
pub const CHECKPOINT_BUDGET: f64 = 0.045;
/// Interval until the first checkpoint's cost is known, unless the
/// estimate of it leaves room for the final checkpoint alone.
pub const FIRST_CHECKPOINT: u64 = 20;
/// Longest automatic interval.
pub const MAX_AUTO_INTERVAL: u64 = 1000;

/// The interval that spreads `middle` checkpoints (any fraction dropped,
/// none if it is negative) evenly over `remaining` steps ahead of the
/// final one, within 1 and [`MAX_AUTO_INTERVAL`].
fn spread(remaining: u64, middle: f64) -> u64 {
    // `as` saturates: NaN and negatives give 0, huge counts `u64::MAX`.
    let middle = middle.floor().max(0.0) as u64;
    remaining
        .div_ceil(middle.saturating_add(1))
        .clamp(1, MAX_AUTO_INTERVAL)
}

/// Peers that failed this job, each kept out for a while that doubles with
/// every failure.
#[derive(Clone, Debug, Default)]
pub struct BanList {
    entries: HashMap<PeerId, (u32, Instant)>,
}

/// How long a peer's first failure keeps it out.
pub const BAN_BASE: Duration = Duration::from_secs(60);

impl BanList {
    pub fn ban(&mut self, peer: PeerId, now: Instant) {
        let e = self.entries.entry(peer).or_insert((0, now));
        e.0 += 1;
        e.1 = now + BAN_BASE * 2u32.saturating_pow(e.0 - 1).min(64);
    }

    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.entries
            .get(peer)
            .is_some_and(|(_, until)| now < *until)
    }

    /// The peers banned at `now`, in a stable order.
    pub fn banned(&self, now: Instant) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, (_, until))| now < *until)
            .map(|(p, _)| *p)
            .collect();
        v.sort_by_key(|p| p.to_bytes());
        v
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for `Ready`.
    SettingUp,
    /// Waiting for the logits of `step`.
    Output(u64),
    /// Waiting for the acknowledgement of `step`.
    Ack(u64),
    Checkpointing(u64),
    Probing,
    Evaluating,
    Finishing,
    Done,
}

/// One failover, for the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Failover {
    pub reason: String,
    pub blamed: Vec<PeerId>,
    /// The checkpoint the job went back to.
    pub restored_step: u64,
    /// Steps that had been done past it.
    pub replayed_steps: u64,
    /// From the failure to the rings being ready again.
    pub recovery: Option<Duration>,
}

/// The training job.
#[derive(Debug)]
pub struct TrainMachine {
    schedule: Schedule,
    phase: Phase,
    queue: std::collections::VecDeque<Action>,
    /// The last checkpoint the owner holds.
    checkpoint: u64,
    /// The highest step whose forward pass was sent.
    sent: u64,
    /// The highest step acknowledged in this run.
    acked: u64,
    /// The interval in use (after the automatic choice, if any).
    interval: u64,
    bans: BanList,
    failovers: Vec<Failover>,
    failed_at: Option<Instant>,
    stopping: bool,
    /// When the current wait began (for its deadline).
    waiting_since: Option<Instant>,
    /// When the first step since the last checkpoint was sent, and the
    /// step acknowledged then.
    run_clock: Option<(Instant, u64)>,
    checkpoint_started: Option<Instant>,
    /// Measured so far: training time and steps, checkpoint time.
    trained_seconds: f64,
    trained_steps: u64,
    checkpoint_seconds: f64,
}

impl TrainMachine {
    /// A job that starts at the checkpoint after `start` steps (0 for a
    /// new job whose slots do not exist yet).
    pub fn new(schedule: Schedule, start: u64, fresh: bool) -> Self {
        let remaining = schedule.total_steps.saturating_sub(start);
        let interval = match (schedule.checkpoint_every, schedule.checkpoint_estimate) {
            (Some(every), _) => every.max(1),
            // Checkpoints of `cost` steps each, the final one included,
            // within the budget of the steps still to run: where only the
            // final one fits, none before it. The estimate only decides
            // that; where more fit, the first one's measured cost spaces
            // them (an estimate from bytes misjudges compute-heavy steps).
            (None, Some(cost)) if cost.is_finite() && cost > 0.0 => {
                let left = CHECKPOINT_BUDGET * remaining as f64 - cost;
                match spread(remaining, left / cost) {
                    alone if alone >= remaining => alone,
                    _ => FIRST_CHECKPOINT,
                }
            }
            (None, _) => FIRST_CHECKPOINT,
        };
        let mut m = Self {
            schedule,
            phase: Phase::SettingUp,
            queue: Default::default(),
            checkpoint: start,
            sent: start,
            acked: start,
            interval,
            bans: BanList::default(),
            failovers: Vec::new(),
            failed_at: None,
            stopping: false,
            waiting_since: None,
            run_clock: None,
            checkpoint_started: None,
            trained_seconds: 0.0,
            trained_steps: 0,
            checkpoint_seconds: 0.0,
        };
        m.queue.push_back(Action::Setup {
            restore: (!fresh).then_some(start),
            avoid: Vec::new(),
        });
        m
    }

    /// The next thing to do, if any is queued. `now` starts the deadline
    /// of a wait.
    pub fn next_action(&mut self, now: Instant) -> Option<Action> {
        let a = self.queue.pop_front()?;
        match &a {
            Action::AwaitOutput { step } => {
                self.phase = Phase::Output(*step);
                self.waiting_since = Some(now);
            }
            Action::AwaitAck { step } => {
                self.phase = Phase::Ack(*step);
                self.waiting_since = Some(now);
            }
            Action::Setup { .. } => {
                self.phase = Phase::SettingUp;
                self.waiting_since = None;
            }
            Action::Checkpoint { step } => {
                self.phase = Phase::Checkpointing(*step);
                self.waiting_since = Some(now);
                self.checkpoint_started = Some(now);
            }
            Action::Probe => self.phase = Phase::Probing,
            Action::Evaluate => {
                self.phase = Phase::Evaluating;
                self.waiting_since = Some(now);
            }
            Action::SendForward { step } => {
                self.sent = *step;
                if self.run_clock.is_none() {
                    self.run_clock = Some((now, self.acked));
                }
            }
            Action::Finish => self.phase = Phase::Finishing,
            Action::Stop { .. } | Action::Abort { .. } => self.phase = Phase::Done,
        }
        Some(a)
    }

    /// When the current wait times out, if the machine is waiting on the
    /// network.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Output(_) | Phase::Ack(_) | Phase::Checkpointing(_) | Phase::Evaluating => {
                self.waiting_since.map(|t| t + self.schedule.step_timeout)
            }
            _ => None,
        }
    }

    /// Called when [`TrainMachine::deadline`] has passed without a reply.
    pub fn timed_out(&mut self, now: Instant) {
        if self.deadline().is_some_and(|d| now >= d) {
            self.waiting_since = None;
            self.queue.clear();
            self.queue.push_back(Action::Probe);
        }
    }

    pub fn on(&mut self, event: Event, now: Instant) {
        match event {
            Event::Interrupt => {
                self.stopping = true;
                if matches!(self.phase, Phase::Finishing | Phase::Evaluating) {
                    // Almost done: let the job end normally.
                    return;
                }
                // While setting up, stop right here.
                if matches!(self.phase, Phase::SettingUp | Phase::Probing | Phase::Done) {
                    self.finish_stop();
                    return;
                }
                // Send no new step; the steps already sent finish first.
                let sent = self.sent;
                self.queue.retain(|a| match a {
                    Action::SendForward { .. } => false,
                    Action::AwaitOutput { step } => *step <= sent,
                    _ => true,
                });
                if self.queue.is_empty() && self.waiting_since.is_none() {
                    // Between two steps, no answer pending.
                    if self.acked > self.checkpoint {
                        self.queue
                            .push_back(Action::Checkpoint { step: self.acked });
                    } else {
                        self.finish_stop();
                    }
                }
            }
            Event::Failed { blamed, reason } => self.fail(blamed, reason, now),
            Event::Ready => {
                if let Some(t) = self.failed_at.take() {
                    if let Some(f) = self.failovers.last_mut() {
                        f.recovery = Some(now.saturating_duration_since(t));
                    }
                }
                self.sent = self.checkpoint;
                self.acked = self.checkpoint;
                self.run_clock = None;
                if self.stopping {
                    self.finish_stop();
                } else if self.checkpoint >= self.schedule.total_steps {
                    self.queue.push_back(Action::Evaluate);
                } else {
                    self.send_next();
                }
            }
            Event::Output { step } if self.phase == Phase::Output(step) => {
                self.waiting_since = None;
                if self.schedule.pipeline
                    && !self.stopping
                    && step < self.schedule.total_steps
                    && !self.is_checkpoint_step(step)
                {
                    self.queue.push_back(Action::SendForward { step: step + 1 });
                }
                self.queue.push_back(Action::AwaitAck { step });
            }
            Event::Acked { step } if self.phase == Phase::Ack(step) => {
                self.waiting_since = None;
                self.acked = step;
                if self.sent > step {
                    // A pipelined step is on its way.
                    self.queue.push_back(Action::AwaitOutput { step: step + 1 });
                } else if self.is_checkpoint_step(step) || self.stopping {
                    self.queue.push_back(Action::Checkpoint { step });
                } else {
                    self.send_next();
                }
            }
            Event::Checkpointed { step } if self.phase == Phase::Checkpointing(step) => {
                self.waiting_since = None;
                self.checkpoint = step;
                self.tune_interval(step, now);
                if self.stopping {
                    self.finish_stop();
                } else if step >= self.schedule.total_steps {
                    self.queue.push_back(Action::Evaluate);
                } else {
                    self.send_next();
                }
            }
            Event::Evaluated if self.phase == Phase::Evaluating => {
                self.waiting_since = None;
                self.queue.push_back(Action::Finish);
            }
            other => self.fail(
                vec![],
                format!("unexpected event {other:?} in phase {:?}", self.phase),
                now,
            ),
        }
    }

    fn finish_stop(&mut self) {
        self.queue.clear();
        self.queue.push_back(Action::Stop {
            step: self.checkpoint,
        });
    }

    fn send_next(&mut self) {
        let step = self.acked + 1;
        self.queue.push_back(Action::SendForward { step });
        self.queue.push_back(Action::AwaitOutput { step });
    }

    fn is_checkpoint_step(&self, step: u64) -> bool {
        step >= self.schedule.total_steps || step >= self.checkpoint + self.interval
    }

    /// With an automatic interval: after each checkpoint, from the measured
    /// time of a step and of a checkpoint, space the checkpoints still to
    /// come (the final one included) so that all of them together take at
    /// most [`CHECKPOINT_BUDGET`] of the job's time.
    fn tune_interval(&mut self, step: u64, now: Instant) {
        let clock = self.run_clock.take();
        let started = self.checkpoint_started.take();
        let (Some((since, from)), Some(started)) = (clock, started) else {
            return;
        };
        if step <= from {
            return;
        }
        let training = started.saturating_duration_since(since).as_secs_f64();
        let cost = now.saturating_duration_since(started).as_secs_f64();
        self.trained_seconds += training;
        self.trained_steps += step - from;
        self.checkpoint_seconds += cost;
        if self.schedule.checkpoint_every.is_some() || self.trained_steps == 0 {
            return;
        }
        let per_step = self.trained_seconds / self.trained_steps as f64;
        let remaining = self.schedule.total_steps.saturating_sub(step);
        if remaining == 0 || cost <= 0.0 {
            return;
        }
        let job = self.trained_seconds + remaining as f64 * per_step;
        // What the checkpoints still to come may cost, the final one apart.
        let left = CHECKPOINT_BUDGET * job - self.checkpoint_seconds - cost;
        self.interval = spread(remaining, left / cost);
    }

    fn fail(&mut self, blamed: Vec<PeerId>, reason: String, now: Instant) {
        if self.phase == Phase::Done {
            return;
        }
        for p in &blamed {
            self.bans.ban(*p, now);
        }
        self.queue.clear();
        self.waiting_since = None;
        let replayed = self.acked.saturating_sub(self.checkpoint);
        self.run_clock = None;
        self.checkpoint_started = None;
        if self.failovers.len() as u32 >= self.schedule.max_failovers {
            let reason = if self.failovers.is_empty() {
                reason
            } else {
                format!(
                    "{reason} (after {} failovers, the most this job allows)",
                    self.failovers.len()
                )
            };
            self.queue.push_back(Action::Abort { reason });
            return;
        }
        self.failovers.push(Failover {
            reason,
            blamed,
            restored_step: self.checkpoint,
            replayed_steps: replayed,
            recovery: None,
        });
        self.failed_at = Some(now);
        if self.stopping {
            self.finish_stop();
            return;
        }
        self.queue.push_back(Action::Setup {
            restore: Some(self.checkpoint),
            avoid: self.bans.banned(now),
        });
    }

    /// Failovers so far: each one a new run of the job from a checkpoint.
    pub fn failovers(&self) -> &[Failover] {
        &self.failovers
    }

    /// Steps done twice because of failovers.
    pub fn replayed_steps(&self) -> u64 {
        self.failovers.iter().map(|f| f.replayed_steps).sum()
    }

    /// The last checkpoint the owner holds.
    pub fn checkpoint_step(&self) -> u64 {
        self.checkpoint
    }

    /// The checkpoint interval in use.
    pub fn checkpoint_interval(&self) -> u64 {
        self.interval
    }

    pub fn bans(&self) -> &BanList {
        &self.bans
    }

    /// Whether the job has ended (finished, stopped or given up).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done && self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(total: u64, every: u64, max_failovers: u32) -> Schedule {
        Schedule {
            total_steps: total,
            checkpoint_every: Some(every),
            checkpoint_estimate: None,
            pipeline: true,
            max_failovers,
            step_timeout: Duration::from_secs(10),
        }
    }

    /// Answers every action the way a healthy network would, except that
    /// `fail(action, steps_acked)` may turn one into a failure; returns the
    /// actions in order.
    fn drive(
        m: &mut TrainMachine,
        mut fail: impl FnMut(&Action) -> Option<Event>,
        t0: Instant,
    ) -> Vec<Action> {
        let mut log = Vec::new();
        let mut now = t0;
        while let Some(a) = m.next_action(now) {
            now += Duration::from_millis(10);
            log.push(a.clone());
            if let Some(ev) = fail(&a) {
                m.on(ev, now);
                continue;
            }
            let ev = match a {
                Action::Setup { .. } => Some(Event::Ready),
                Action::SendForward { .. } => None,
                Action::AwaitOutput { step } => Some(Event::Output { step }),
                Action::AwaitAck { step } => Some(Event::Acked { step }),
                Action::Checkpoint { step } => Some(Event::Checkpointed { step }),
                Action::Evaluate => Some(Event::Evaluated),
                Action::Probe => Some(Event::Failed {
                    blamed: vec![],
                    reason: "timeout".into(),
                }),
                Action::Finish | Action::Stop { .. } | Action::Abort { .. } => break,
            };
            if let Some(ev) = ev {
                m.on(ev, now);
            }
        }
        log
    }

    /// The steps whose acknowledgement was awaited, in order.
    fn acked(log: &[Action]) -> Vec<u64> {
        log.iter()
            .filter_map(|a| match a {
                Action::AwaitAck { step } => Some(*step),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_uninterrupted_job_runs_every_step_once_and_checkpoints_on_schedule() {
        let mut m = TrainMachine::new(schedule(10, 4, 5), 0, true);
        let log = drive(&mut m, |_| None, Instant::now());
        assert_eq!(acked(&log), (1..=10).collect::<Vec<_>>());
        let cps: Vec<u64> = log
            .iter()
            .filter_map(|a| match a {
                Action::Checkpoint { step } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(cps, vec![4, 8, 10]);
        assert_eq!(
            log.first(),
            Some(&Action::Setup {
                restore: None,
                avoid: vec![]
            })
        );
        assert_eq!(&log[log.len() - 2..], &[Action::Evaluate, Action::Finish]);
        // Pipelined: step 2 goes out before step 1 is acknowledged, but
        // never across a checkpoint.
        let pos = |x: &Action| log.iter().position(|a| a == x).expect("present");
        assert!(pos(&Action::SendForward { step: 2 }) < pos(&Action::AwaitAck { step: 1 }));
        assert!(pos(&Action::SendForward { step: 5 }) > pos(&Action::Checkpoint { step: 4 }));
        assert_eq!(m.failovers().len(), 0);
    }

    #[test]
    fn a_failure_anywhere_replays_from_the_last_checkpoint() {
        let peer = PeerId::random();
        // Fail in the forward pass, the backward pass, between steps and
        // during a checkpoint.
        let cases: Vec<(Action, u64, u64)> = vec![
            (Action::AwaitOutput { step: 6 }, 4, 1),
            (Action::AwaitAck { step: 7 }, 4, 2),
            (Action::SendForward { step: 5 }, 4, 0),
            (Action::Checkpoint { step: 8 }, 4, 4),
            (Action::AwaitOutput { step: 2 }, 0, 1),
            (Action::Evaluate, 10, 0),
            (Action::Finish, 10, 0),
        ];
        for (at, restored, replayed) in cases {
            let mut m = TrainMachine::new(schedule(10, 4, 5), 0, true);
            let mut fired = false;
            let log = drive(
                &mut m,
                |a| {
                    (!fired && *a == at).then(|| {
                        fired = true;
                        Event::Failed {
                            blamed: vec![peer],
                            reason: "hop died".into(),
                        }
                    })
                },
                Instant::now(),
            );
            assert!(fired, "{at:?}");
            let setup = log
                .iter()
                .filter(|a| matches!(a, Action::Setup { .. }))
                .nth(1)
                .expect("a second run");
            assert_eq!(
                setup,
                &Action::Setup {
                    restore: Some(restored),
                    avoid: vec![peer]
                },
                "{at:?}"
            );
            // Every step is acknowledged in the end; those after the
            // checkpoint twice when they had been done.
            let steps = acked(&log);
            let mut uniq = steps.clone();
            uniq.dedup();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq, (1..=10).collect::<Vec<_>>(), "{at:?}");
            assert_eq!(m.failovers().len(), 1);
            assert_eq!(m.replayed_steps(), replayed, "{at:?}");
            assert!(m.failovers()[0].recovery.is_some());
            assert!(matches!(log.last(), Some(Action::Finish)));
        }
    }

    #[test]
    fn a_hang_is_probed_then_failed_over() {
        let t0 = Instant::now();
        let mut m = TrainMachine::new(schedule(5, 2, 3), 0, true);
        assert!(matches!(m.next_action(t0), Some(Action::Setup { .. })));
        m.on(Event::Ready, t0);
        assert_eq!(m.next_action(t0), Some(Action::SendForward { step: 1 }));
        assert_eq!(m.next_action(t0), Some(Action::AwaitOutput { step: 1 }));
        let deadline = m.deadline().expect("a wait has a deadline");
        assert_eq!(deadline, t0 + Duration::from_secs(10));
        // Before the deadline nothing happens.
        m.timed_out(t0 + Duration::from_secs(9));
        assert_eq!(m.next_action(t0), None);
        m.timed_out(deadline);
        assert_eq!(m.next_action(deadline), Some(Action::Probe));
        let hung = PeerId::random();
        m.on(
            Event::Failed {
                blamed: vec![hung],
                reason: "no reply".into(),
            },
            deadline,
        );
        assert_eq!(
            m.next_action(deadline),
            Some(Action::Setup {
                restore: Some(0),
                avoid: vec![hung]
            })
        );
        // The ban lasts a while, then the peer may come back.
        assert!(m.bans().is_banned(&hung, deadline + BAN_BASE / 2));
        assert!(!m.bans().is_banned(&hung, deadline + BAN_BASE * 2));
    }

    #[test]
    fn failovers_are_bounded_and_zero_means_stop_at_once() {
        for max in [0u32, 2] {
            let mut m = TrainMachine::new(schedule(10, 4, max), 0, true);
            let log = drive(
                &mut m,
                |a| {
                    matches!(a, Action::AwaitAck { step: 6 }).then(|| Event::Failed {
                        blamed: vec![PeerId::random()],
                        reason: "host lost".into(),
                    })
                },
                Instant::now(),
            );
            match log.last() {
                Some(Action::Abort { reason }) => assert!(reason.contains("host lost")),
                other => panic!("expected an abort, got {other:?}"),
            }
            assert_eq!(m.failovers().len() as u32, max);
            assert_eq!(m.checkpoint_step(), 4);
        }
    }

    #[test]
    fn an_interrupt_finishes_the_step_checkpoints_and_stops() {
        let t0 = Instant::now();
        let mut m = TrainMachine::new(schedule(100, 50, 3), 0, true);
        let mut interrupted = false;
        let mut log = Vec::new();
        while let Some(a) = m.next_action(t0) {
            log.push(a.clone());
            let ev = match a {
                Action::Setup { .. } => Some(Event::Ready),
                Action::SendForward { .. } => None,
                Action::AwaitOutput { step } => {
                    if step == 3 && !interrupted {
                        interrupted = true;
                        m.on(Event::Interrupt, t0);
                    }
                    Some(Event::Output { step })
                }
                Action::AwaitAck { step } => Some(Event::Acked { step }),
                Action::Checkpoint { step } => Some(Event::Checkpointed { step }),
                _ => break,
            };
            if let Some(ev) = ev {
                m.on(ev, t0);
            }
        }
        assert_eq!(
            &log[log.len() - 3..],
            &[
                Action::AwaitAck { step: 3 },
                Action::Checkpoint { step: 3 },
                Action::Stop { step: 3 }
            ]
        );
        assert!(!log.contains(&Action::SendForward { step: 4 }));
    }

    #[test]
    fn an_interrupt_between_actions_never_leaves_a_step_unfinished() {
        // Interrupt after every kind of event: the job always ends with a
        // checkpoint of the last step it acknowledged, then stops.
        for at in 1..14 {
            let t0 = Instant::now();
            let mut m = TrainMachine::new(schedule(100, 5, 3), 0, true);
            let mut events = 0;
            let mut log = Vec::new();
            while let Some(a) = m.next_action(t0) {
                log.push(a.clone());
                let ev = match a {
                    Action::Setup { .. } => Some(Event::Ready),
                    Action::SendForward { .. } => None,
                    Action::AwaitOutput { step } => Some(Event::Output { step }),
                    Action::AwaitAck { step } => Some(Event::Acked { step }),
                    Action::Checkpoint { step } => Some(Event::Checkpointed { step }),
                    _ => break,
                };
                if let Some(ev) = ev {
                    m.on(ev, t0);
                    events += 1;
                    if events == at {
                        m.on(Event::Interrupt, t0);
                    }
                }
                assert!(log.len() < 1000, "runaway at {at}");
            }
            let sent: Vec<u64> = log
                .iter()
                .filter_map(|a| match a {
                    Action::SendForward { step } => Some(*step),
                    _ => None,
                })
                .collect();
            let last = sent.last().copied().unwrap_or(0);
            assert!(acked(&log).contains(&last) || last == 0, "at {at}: {log:?}");
            match log.last() {
                Some(Action::Stop { step }) => {
                    assert_eq!(*step, last, "at {at}: {log:?}");
                    assert_eq!(*step, m.checkpoint_step());
                }
                other => panic!("at {at}: ended with {other:?}"),
            }
        }
    }

    #[test]
    fn a_resumed_job_restores_first_and_a_finished_one_only_evaluates() {
        let mut m = TrainMachine::new(schedule(10, 4, 3), 8, false);
        let log = drive(&mut m, |_| None, Instant::now());
        assert_eq!(
            log[0],
            Action::Setup {
                restore: Some(8),
                avoid: vec![]
            }
        );
        assert_eq!(acked(&log), vec![9, 10]);
        let mut m = TrainMachine::new(schedule(10, 4, 3), 10, false);
        let log = drive(&mut m, |_| None, Instant::now());
        assert_eq!(
            log,
            vec![
                Action::Setup {
                    restore: Some(10),
                    avoid: vec![]
                },
                Action::Evaluate,
                Action::Finish
            ]
        );
    }

    /// Runs a whole job with steps of `step_ms` and checkpoints of
    /// `checkpoint_ms`; returns (checkpoint time / job time, checkpoints).
    fn simulate(total: u64, step_ms: u64, checkpoint_ms: u64) -> (f64, u64) {
        simulate_estimated(total, step_ms, checkpoint_ms, None).0
    }

    /// A healthy job of `total` steps of `step_ms` each, with an automatic
    /// interval, checkpoints of `checkpoint_ms` and, when given, an estimate
    /// of their cost in steps: the share of the time checkpoints took, and
    /// how many there were; then the step of the first checkpoint.
    fn simulate_estimated(
        total: u64,
        step_ms: u64,
        checkpoint_ms: u64,
        estimate: Option<f64>,
    ) -> ((f64, u64), Option<u64>) {
        let t0 = Instant::now();
        let mut s = schedule(total, 1, 0);
        s.checkpoint_every = None;
        s.checkpoint_estimate = estimate;
        let mut first = None;
        let mut m = TrainMachine::new(s, 0, true);
        let mut now = t0;
        let (mut spent, mut count) = (Duration::ZERO, 0);
        while let Some(a) = m.next_action(now) {
            let ev = match a {
                Action::Setup { .. } => Some(Event::Ready),
                Action::SendForward { .. } => None,
                Action::AwaitOutput { step } => Some(Event::Output { step }),
                Action::AwaitAck { step } => {
                    now += Duration::from_millis(step_ms);
                    Some(Event::Acked { step })
                }
                Action::Checkpoint { step } => {
                    now += Duration::from_millis(checkpoint_ms);
                    spent += Duration::from_millis(checkpoint_ms);
                    count += 1;
                    first.get_or_insert(step);
                    Some(Event::Checkpointed { step })
                }
                Action::Evaluate => Some(Event::Evaluated),
                _ => break,
            };
            if let Some(ev) = ev {
                m.on(ev, now);
            }
        }
        let job = now.saturating_duration_since(t0);
        ((spent.as_secs_f64() / job.as_secs_f64(), count), first)
    }

    #[test]
    fn an_estimated_checkpoint_cost_keeps_even_the_first_within_budget() {
        // `bench paper` on two cores: 235 steps of 16 ms, checkpoints of
        // 110 ms, estimated at 7.5 steps. The fixed first checkpoint after
        // 20 steps alone would take 2.8% of the job, and with the final one
        // more than the budget.
        let (blind, _) = simulate_estimated(235, 16, 110, None);
        assert!(blind.0 > 0.05 && blind.1 == 2, "{blind:?}");
        let ((share, count), first) = simulate_estimated(235, 16, 110, Some(7.5));
        assert!(share <= 0.05, "{share}");
        assert_eq!((count, first), (1, Some(235)), "only the final one");
        // Ten epochs have room for more: the first after 20 steps, as
        // without an estimate, then as many as the budget allows, whether
        // the estimate was right or far off either way.
        let most = (0.045 * 2350.0 * 16.0 / 110.0) as u64;
        for estimate in [7.5, 0.1, 100.0] {
            let ((share, count), first) = simulate_estimated(2350, 16, 110, Some(estimate));
            assert!(share <= 0.05, "{estimate}: {share}");
            assert!(count + 1 >= most && count <= most + 1, "{count} of {most}");
            assert_eq!(first, Some(FIRST_CHECKPOINT), "{estimate}");
        }
        // A job long enough for a checkpoint before the final one, by the
        // estimate, takes its first after 20 steps too.
        let (_, first) = simulate_estimated(500, 16, 110, Some(7.5));
        assert_eq!(first, Some(FIRST_CHECKPOINT));
        // Estimates that mean nothing fall back to the fixed first interval.
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let (_, first) = simulate_estimated(235, 16, 110, Some(bad));
            assert_eq!(first, Some(FIRST_CHECKPOINT), "{bad}");
        }
    }

    #[test]
    fn the_automatic_interval_keeps_checkpoints_within_their_budget() {
        // (steps, step ms, checkpoint ms): the paper's job of one epoch and
        // of ten, a long job of fast steps.
        for (total, step, ckpt) in [(235, 64, 280), (2350, 64, 280), (10_000, 20, 100)] {
            let (share, count) = simulate(total, step, ckpt);
            assert!(share <= 0.05, "{total} steps: {:.1}%", share * 100.0);
            // Not far below either: checkpoints as often as the budget allows.
            let most = (0.05 * (total * step) as f64 / ckpt as f64) as u64;
            let fit = most.min(total / FIRST_CHECKPOINT) as f64;
            assert!(
                count >= 2 && count as f64 >= 0.8 * fit,
                "{total} steps: {count} checkpoints, {most} fit"
            );
        }
        // Never longer apart than the cap, however cheap checkpoints are.
        let (_, count) = simulate(5000, 50, 1);
        assert!(count >= 5000 / MAX_AUTO_INTERVAL);
    }
}
