//! How the pipeline's driver waits and keeps time: one [`Signal`] that any completion wakes, a
//! per-operation [`Op`] that remembers when its future woke (so a read that finished while compute ran
//! is timed by when it finished, not by when the driver got round to it), and [`Busy`], the length of a
//! union of time intervals.

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::SlotRange;
use crate::error::Result;
use crate::mem::IoBuffer;

use super::io::SlotFuture;

/// Woken by every completion; the driver sleeps on it when it has nothing to do.
#[derive(Debug, Default)]
pub(super) struct Signal {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    /// Forgets earlier wake-ups. Call before looking at the operations: a completion after this
    /// makes the next [`wait`](Self::wait) return at once, so none is lost.
    pub fn reset(&self) {
        *self.woken.lock() = false;
    }
    /// Sleeps until woken (since the last reset).
    pub fn wait(&self) {
        let mut w = self.woken.lock();
        while !*w {
            self.cv.wait(&mut w);
        }
    }
    fn notify(&self) {
        *self.woken.lock() = true;
        self.cv.notify_one();
    }
}

/// The waker of one operation: notes when it was woken, then wakes the driver.
#[derive(Debug)]
struct OpWaker {
    signal: Arc<Signal>,
    woke_at: Mutex<Option<Instant>>,
}

impl Wake for OpWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        *self.woke_at.lock() = Some(Instant::now());
        self.signal.notify();
    }
}

/// One fill or write in flight: its slot, its future, when it started, and (once it is ready) its
/// result and when it finished.
pub(super) struct Op {
    pub range: SlotRange,
    pub started: Instant,
    fut: Option<SlotFuture>,
    waker: Arc<OpWaker>,
    result: Option<Result<IoBuffer>>,
    pub done_at: Option<Instant>,
}

impl Op {
    /// Wraps a just-started operation and polls it once, so that its completion wakes `signal`.
    pub fn start(range: SlotRange, started: Instant, fut: SlotFuture, signal: &Arc<Signal>) -> Op {
        let mut op = Op {
            range,
            started,
            fut: Some(fut),
            waker: Arc::new(OpWaker {
                signal: signal.clone(),
                woke_at: Mutex::new(None),
            }),
            result: None,
            done_at: None,
        };
        op.poll();
        op
    }

    /// Whether the operation has finished (polling it if it had not).
    pub fn poll(&mut self) -> bool {
        let Some(fut) = self.fut.as_mut() else {
            return true;
        };
        let waker = Waker::from(self.waker.clone());
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(r) => {
                let now = Instant::now();
                // When it finished: its last wake-up, or now if it was ready before it could wake us.
                let woke = self.waker.woke_at.lock().take();
                self.done_at = Some(woke.map_or(now, |t| t.clamp(self.started, now)));
                self.result = Some(r);
                self.fut = None;
                true
            }
        }
    }

    /// The result, once (after [`poll`](Self::poll) said it finished).
    pub fn take(&mut self) -> Option<Result<IoBuffer>> {
        self.result.take()
    }

    pub fn finished(&self) -> bool {
        self.fut.is_none()
    }
}

/// The total length of a union of intervals given in order of their starts: time during which at least
/// one of them was running.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Busy {
    covered_until: Option<Instant>,
    pub total: Duration,
    pub count: u64,
}

impl Busy {
    pub fn add(&mut self, start: Instant, end: Instant) {
        self.count += 1;
        let from = self.covered_until.map_or(start, |c| c.max(start));
        if end > from {
            self.total += end - from;
            self.covered_until = Some(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_the_union_of_overlapping_intervals() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut b = Busy::default();
        b.add(ms(0), ms(10));
        b.add(ms(5), ms(8)); // inside the first
        b.add(ms(6), ms(15)); // overlaps: +5
        b.add(ms(20), ms(30)); // gap: +10
        assert_eq!(b.total, Duration::from_millis(25));
        assert_eq!(b.count, 4);
    }

    #[test]
    fn a_wake_after_reset_is_never_lost() {
        let s = Arc::new(Signal::default());
        s.reset();
        s.notify();
        s.wait(); // returns at once
        s.reset();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            s2.notify();
        });
        s.wait();
        t.join().unwrap();
    }
}
