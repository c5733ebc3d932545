//! The order in which one slot serves its circuits. Pure: messages and
//! `now` in, decisions out; [`super::host::SlotCell`] carries them out.
//!
//! The forward and backward circuits of one run of a job (and inference
//! circuits reading the same slot) deliver messages independently. For
//! training to equal local training, everything but a backward pass waits
//! until every training step that went forward has come back: a forward
//! pass, an evaluation or a checkpoint sees the parameters after every
//! update the client sent before it. A message that has to wait gets a
//! ticket; it runs when the slot settles, or fails at its deadline, or
//! when a later run retires the slot.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

/// What a message does to the slot's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A training step's forward pass: once it ran, the step is in flight.
    Forward(u64),
    /// A training step's backward pass: it never waits, and once it ran the
    /// step is no longer in flight.
    Backward(u64),
    /// The owner's state replaces the slot's: nothing is in flight after it.
    Restore,
    /// Anything else (inference, control, checkpoint): waits, changes nothing.
    Other,
}

/// Names one waiting message.
pub type Ticket = u64;

/// What to do with a message or a waiting ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the message now.
    Run,
    /// Keep it waiting under this ticket.
    Wait(Ticket),
    /// Refuse it: the slot was taken over by a later run.
    Refuse(&'static str),
    /// A waiting ticket may run now.
    Wake(Ticket),
    /// A waiting ticket failed: the backward pass it waited for never
    /// came, or the slot was retired.
    Fail(Ticket, &'static str),
}

/// Why a later run's circuits are refused.
pub const RETIRED: &str = "a later run of the job took this slot over";
/// Why a message that waited too long fails.
pub const NEVER_SETTLED: &str = "the backward pass of an earlier step never came";

/// One slot's order of service.
#[derive(Debug, Default)]
pub struct SlotSession {
    /// Training steps that went forward and have not come back.
    in_flight: BTreeSet<u64>,
    waiting: VecDeque<(Ticket, Instant)>,
    next_ticket: Ticket,
    retired: bool,
}

impl SlotSession {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_retired(&self) -> bool {
        self.retired
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A message of `kind` arrived; `deadline` bounds its wait.
    pub fn arrive(&mut self, kind: Kind, deadline: Instant) -> Action {
        if self.retired {
            return Action::Refuse(RETIRED);
        }
        if matches!(kind, Kind::Backward(_)) || self.in_flight.is_empty() {
            return Action::Run;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back((ticket, deadline));
        Action::Wait(ticket)
    }

    /// A message of `kind` finished running (`ok` if it succeeded). Wakes
    /// what waited for the slot to settle.
    pub fn finished(&mut self, kind: Kind, ok: bool) -> Vec<Action> {
        match (kind, ok) {
            (Kind::Forward(step), true) => {
                self.in_flight.insert(step);
            }
            (Kind::Backward(step), true) => {
                self.in_flight.remove(&step);
            }
            (Kind::Restore, true) => self.in_flight.clear(),
            _ => {}
        }
        if self.in_flight.is_empty() && !self.retired {
            self.waiting
                .drain(..)
                .map(|(t, _)| Action::Wake(t))
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Fail the tickets whose deadline passed at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.waiting.retain(|&(t, deadline)| {
            let late = now >= deadline;
            if late {
                out.push(Action::Fail(t, NEVER_SETTLED));
            }
            !late
        });
        out
    }

    /// Forget a ticket whose message went away.
    pub fn cancel(&mut self, ticket: Ticket) {
        self.waiting.retain(|&(t, _)| t != ticket);
    }

    /// A later run took the slot over: refuse everything from now on.
    pub fn retire(&mut self) -> Vec<Action> {
        self.retired = true;
        self.waiting
            .drain(..)
            .map(|(t, _)| Action::Fail(t, RETIRED))
            .collect()
    }

    /// The earliest deadline of a waiting ticket.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|&(_, d)| d).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later(s: u64) -> Instant {
        Instant::now() + Duration::from_secs(s)
    }

    #[test]
    fn a_forward_waits_for_the_previous_steps_backward() {
        let mut s = SlotSession::new();
        assert_eq!(s.arrive(Kind::Forward(0), later(10)), Action::Run);
        assert!(s.finished(Kind::Forward(0), true).is_empty());
        assert_eq!(s.in_flight(), 1);
        // Step 1 and a checkpoint wait; the backward of step 0 runs.
        let Action::Wait(a) = s.arrive(Kind::Forward(1), later(10)) else {
            panic!("step 1 must wait")
        };
        let Action::Wait(b) = s.arrive(Kind::Other, later(10)) else {
            panic!("a checkpoint must wait")
        };
        assert_eq!(s.arrive(Kind::Backward(0), later(10)), Action::Run);
        assert_eq!(
            s.finished(Kind::Backward(0), true),
            vec![Action::Wake(a), Action::Wake(b)]
        );
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn a_failed_pass_changes_nothing() {
        let mut s = SlotSession::new();
        s.finished(Kind::Forward(3), false);
        assert_eq!(s.arrive(Kind::Other, later(1)), Action::Run);
        s.finished(Kind::Forward(3), true);
        let Action::Wait(_) = s.arrive(Kind::Other, later(1)) else {
            panic!("must wait")
        };
        assert!(s.finished(Kind::Backward(3), false).is_empty());
        assert_eq!(s.in_flight(), 1);
    }

    #[test]
    fn waiters_fail_at_their_deadline_or_when_retired() {
        let mut s = SlotSession::new();
        s.finished(Kind::Forward(0), true);
        let now = Instant::now();
        let Action::Wait(a) = s.arrive(Kind::Other, now + Duration::from_secs(1)) else {
            panic!()
        };
        let Action::Wait(b) = s.arrive(Kind::Other, now + Duration::from_secs(5)) else {
            panic!()
        };
        assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(1)));
        assert!(s.tick(now).is_empty());
        assert_eq!(
            s.tick(now + Duration::from_secs(2)),
            vec![Action::Fail(a, NEVER_SETTLED)]
        );
        assert_eq!(s.retire(), vec![Action::Fail(b, RETIRED)]);
        assert_eq!(
            s.arrive(Kind::Backward(0), later(1)),
            Action::Refuse(RETIRED)
        );
        // Nothing wakes on a retired slot.
        assert!(s.finished(Kind::Backward(0), true).is_empty());
    }

    #[test]
    fn a_restore_settles_the_slot_and_a_cancelled_ticket_is_forgotten() {
        let mut s = SlotSession::new();
        s.finished(Kind::Forward(0), true);
        s.finished(Kind::Forward(1), true);
        let Action::Wait(a) = s.arrive(Kind::Other, later(5)) else {
            panic!()
        };
        let Action::Wait(b) = s.arrive(Kind::Other, later(5)) else {
            panic!()
        };
        s.cancel(a);
        assert_eq!(s.finished(Kind::Restore, true), vec![Action::Wake(b)]);
    }
}
