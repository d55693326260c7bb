//! Group commit: batches committed by several threads at once share one write and one
//! sync.
//!
//! A commit that finds no other in progress leads: it writes its batch at once. Commits that
//! arrive while a leader writes queue up; when the leader is done, it answers the batches it
//! wrote and hands the lead to the first queued commit, which writes every batch queued by
//! then as one group. So under load each sync covers as many batches as arrived during the
//! one before, and a lone commit waits for nobody.
//!
//! Each batch of a group stays atomic and keeps its own preconditions: the backend checks
//! them in order, each against the state the earlier batches of the group leave, and a
//! batch whose precondition fails is answered with its conflict while the others go on
//! (see [`Group::commit`]).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::{Batch, Error, Result};

/// The most batches one leader writes together.
const MAX_GROUP: usize = 256;

/// The queue of commits of one store.
#[derive(Default)]
pub(crate) struct Group {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// A leader is writing.
    leading: bool,
    /// Commits waiting for the next group, in arrival order.
    waiting: VecDeque<Arc<Waiter>>,
}

/// A queued commit: its batch until a leader takes it, then its turn.
struct Waiter {
    state: Mutex<Turn>,
    wake: Condvar,
}

enum Turn {
    Queued(Batch),
    /// A leader took the batch and is writing it.
    Taken,
    /// The batch was written (or refused): the answer.
    Done(Result<()>),
    /// The batch is still queued, and this commit leads the next group.
    Lead(Batch),
}

impl Group {
    /// Commits `batch` with whatever other commits are waiting: `write` takes the batches of
    /// a group in order and returns one result per batch, in the same order. Every caller
    /// passes the same `write` (the backend's), since a leader writes the others' batches
    /// with its own.
    pub(crate) fn commit(
        &self,
        batch: Batch,
        write: impl Fn(Vec<Batch>) -> Vec<Result<()>>,
    ) -> Result<()> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let own = if queue.leading {
            let me = Arc::new(Waiter {
                state: Mutex::new(Turn::Queued(batch)),
                wake: Condvar::new(),
            });
            queue.waiting.push_back(me.clone());
            drop(queue);
            let mut turn = me.state.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                match std::mem::replace(&mut *turn, Turn::Taken) {
                    Turn::Done(result) => return result,
                    Turn::Lead(batch) => break batch,
                    other => {
                        *turn = other;
                        turn = me.wake.wait(turn).unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        } else {
            queue.leading = true;
            drop(queue);
            batch
        };
        self.lead(own, write)
    }

    /// Writes `own` and the batches queued now as one group, answers them, and hands the
    /// lead on.
    fn lead(&self, own: Batch, write: impl Fn(Vec<Batch>) -> Vec<Result<()>>) -> Result<()> {
        let mut handoff = Handoff {
            group: self,
            members: Vec::new(),
        };
        let mut batches = vec![own];
        {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            while batches.len() < MAX_GROUP {
                let Some(w) = queue.waiting.pop_front() else {
                    break;
                };
                let mut turn = w.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let Turn::Queued(batch) = std::mem::replace(&mut *turn, Turn::Taken) {
                    batches.push(batch);
                }
                drop(turn);
                handoff.members.push(w);
            }
        }
        let n = batches.len();
        let mut results = write(batches).into_iter();
        let own = results.next().unwrap_or_else(|| Err(short(n)));
        for w in std::mem::take(&mut handoff.members) {
            w.answer(results.next().unwrap_or_else(|| Err(short(n))));
        }
        own
    }
}

impl Waiter {
    fn answer(&self, result: Result<()>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Turn::Done(result);
        self.wake.notify_one();
    }
}

fn short(n: usize) -> Error {
    Error::Io(format!(
        "a group commit of {n} batches returned fewer results"
    ))
}

/// Hands the lead to the first queued commit when the leader is done, and answers the
/// group's members with an error if the leader's write panicked (they would wait forever
/// otherwise).
struct Handoff<'a> {
    group: &'a Group,
    /// The members of the group not yet answered.
    members: Vec<Arc<Waiter>>,
}

impl Drop for Handoff<'_> {
    fn drop(&mut self) {
        for w in self.members.drain(..) {
            w.answer(Err(Error::Io(
                "the commit that wrote this batch's group panicked".to_owned(),
            )));
        }
        let mut queue = self
            .group
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match queue.waiting.pop_front() {
            Some(next) => {
                let mut turn = next.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let Turn::Queued(batch) = std::mem::replace(&mut *turn, Turn::Taken) {
                    *turn = Turn::Lead(batch);
                }
                drop(turn);
                next.wake.notify_one();
            }
            None => queue.leading = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Commits from many threads all get their own answer, and groups form while a write
    /// is slow.
    #[test]
    fn every_commit_is_answered_and_slow_writes_group_them() {
        let group = Arc::new(Group::default());
        let writes = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let (group, writes) = (group.clone(), writes.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let mut batch = Batch::new();
                        batch.put("ks", format!("{t}-{i}").into_bytes(), vec![]);
                        // Odd threads' batches are refused, to check answers go to their
                        // own commits.
                        let refuse = t % 2 == 1;
                        let res = group.commit(batch, |batches| {
                            writes.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            batches
                                .iter()
                                .map(|b| {
                                    let Some(crate::Op::Put { key, .. }) = b.ops.first() else {
                                        unreachable!()
                                    };
                                    let t: usize = String::from_utf8_lossy(key)
                                        .split('-')
                                        .next()
                                        .unwrap()
                                        .parse()
                                        .unwrap();
                                    if t % 2 == 1 {
                                        Err(Error::Io(format!("refused {t}")))
                                    } else {
                                        Ok(())
                                    }
                                })
                                .collect()
                        });
                        match res {
                            Ok(()) => assert!(!refuse),
                            Err(e) => {
                                assert!(refuse);
                                assert_eq!(e.to_string(), format!("store I/O error: refused {t}"));
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let writes = writes.load(Ordering::Relaxed);
        assert!(
            writes < 800,
            "{writes} writes for 800 commits: none grouped"
        );
        assert!(!group.queue.lock().unwrap().leading);
    }

    /// A write that panics answers the other members of its group with an error and hands
    /// the lead on; later commits go through.
    #[test]
    fn a_panicking_write_answers_its_group_and_hands_the_lead_on() {
        use std::time::Duration;
        let group = Arc::new(Group::default());
        let ok = |b: Vec<Batch>| b.iter().map(|_| Ok(())).collect::<Vec<_>>();
        let commit = |wait: u64, panics: bool| {
            let group = group.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(wait));
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    group.commit(Batch::new(), |b| {
                        std::thread::sleep(Duration::from_millis(300));
                        if panics {
                            panic!("write failed hard");
                        }
                        ok(b)
                    })
                }))
            })
        };
        // The first leads alone and writes slowly; the second and third queue meanwhile, in
        // that order; the second then leads both and panics.
        let first = commit(0, false);
        let second = commit(100, true);
        let third = commit(200, false);
        assert!(matches!(first.join().unwrap(), Ok(Ok(()))));
        assert!(second.join().unwrap().is_err(), "the second did not panic");
        let third = third.join().unwrap().expect("the third did not lead");
        let Err(e) = third else {
            panic!("the third was not answered with the panic");
        };
        assert!(e.to_string().contains("panicked"), "{e}");
        assert!(group.commit(Batch::new(), ok).is_ok());
        assert!(!group.queue.lock().unwrap().leading);
    }
}
