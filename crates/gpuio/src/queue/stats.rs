//! Per-queue counters and the latency histogram of backend operations (submission to completion, as fio
//! reports completion latency), updated by the engine thread, and by committing threads through a
//! [`Tally`] (see `queue::inline`).

use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    /// A new histogram of nanoseconds covering 1 ns .. 1 h at 3 significant digits (values past the
    /// top are clamped by `saturating_record`).
    pub fn histogram_ns() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
            .expect("static histogram bounds are valid")
    }

    /// Percentiles of a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            samples: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// What a queue has done.
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// Backend operations completed (reads, writes, syncs; retries count again).
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Transient errors (EINTR, EAGAIN, zero-byte writes) retried.
    pub retries: u64,
    /// Short transfers continued.
    pub short_transfers: u64,
    /// Bytes that went through a bounce buffer (unaligned heads/tails or memory).
    pub bounce_bytes: u64,
    /// Direct transfers the kernel refused with EINVAL and that were redone buffered.
    pub direct_fallbacks: u64,
    /// Of `ops`, those served on the committing thread (small transfers of memory-backed files; see
    /// [`EngineConfig::inline_max_bytes`](crate::EngineConfig::inline_max_bytes)).
    pub inline_ops: u64,
    latency_ns: Histogram<u64>,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            ops: 0,
            bytes_read: 0,
            bytes_written: 0,
            retries: 0,
            short_transfers: 0,
            bounce_bytes: 0,
            direct_fallbacks: 0,
            inline_ops: 0,
            latency_ns: LatencySummary::histogram_ns(),
        }
    }
}

impl QueueStats {
    pub(crate) fn record_latency(&mut self, d: Duration) {
        self.latency_ns
            .saturating_record((d.as_nanos() as u64).max(1));
    }

    pub(crate) fn reset(&mut self) {
        *self = QueueStats::default();
    }

    /// Latency percentiles of backend operations.
    pub fn latency(&self) -> LatencySummary {
        LatencySummary::from_ns(&self.latency_ns)
    }

    /// Adds another queue's counts and latencies into this one.
    pub fn merge(&mut self, other: &QueueStats) {
        self.ops += other.ops;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.retries += other.retries;
        self.short_transfers += other.short_transfers;
        self.bounce_bytes += other.bounce_bytes;
        self.direct_fallbacks += other.direct_fallbacks;
        self.inline_ops += other.inline_ops;
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

/// Operations a committing thread did, counted without the queue's lock and added to its
/// [`QueueStats`] in one step every [`Tally::LATENCIES`] operations (and at the end): several threads
/// serving command buffers of one queue must not hold its lock while they copy.
pub(crate) struct Tally {
    ops: u64,
    bytes_read: u64,
    bytes_written: u64,
    retries: u64,
    short_transfers: u64,
    latencies_ns: [u64; Tally::LATENCIES],
    latencies: usize,
}

impl Tally {
    const LATENCIES: usize = 64;

    pub(crate) fn new() -> Tally {
        Tally {
            ops: 0,
            bytes_read: 0,
            bytes_written: 0,
            retries: 0,
            short_transfers: 0,
            latencies_ns: [0; Tally::LATENCIES],
            latencies: 0,
        }
    }

    /// One operation that took `d` and moved `read` / `written` bytes.
    pub(crate) fn op(&mut self, d: Duration, read: u64, written: u64, into: &Mutex<QueueStats>) {
        self.ops += 1;
        self.bytes_read += read;
        self.bytes_written += written;
        self.latencies_ns[self.latencies] = (d.as_nanos() as u64).max(1);
        self.latencies += 1;
        if self.latencies == Tally::LATENCIES {
            self.flush(into);
        }
    }
    pub(crate) fn retry(&mut self) {
        self.retries += 1;
    }
    pub(crate) fn short_transfer(&mut self) {
        self.short_transfers += 1;
    }

    /// Adds what was counted to `into` (as inline operations) and starts again.
    pub(crate) fn flush(&mut self, into: &Mutex<QueueStats>) {
        if self.ops == 0 && self.retries == 0 && self.short_transfers == 0 {
            return;
        }
        let mut s = into.lock();
        s.ops += self.ops;
        s.inline_ops += self.ops;
        s.bytes_read += self.bytes_read;
        s.bytes_written += self.bytes_written;
        s.retries += self.retries;
        s.short_transfers += self.short_transfers;
        for &ns in &self.latencies_ns[..self.latencies] {
            s.latency_ns.saturating_record(ns);
        }
        drop(s);
        // The latencies' array is only read up to `latencies`: no need to zero it again.
        self.ops = 0;
        self.bytes_read = 0;
        self.bytes_written = 0;
        self.retries = 0;
        self.short_transfers = 0;
        self.latencies = 0;
    }
}
