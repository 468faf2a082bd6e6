//! The programmed-I/O vs DMA sweep: for each transfer size, the median time of one host → device
//! copy, issued and waited for, done by a copy-engine DMA ([`crate::CopyStream::copy_h2d_async`]) and by the
//! device's threads reading mapped pinned memory ([`crate::CopyStream::copy_h2d_mapped_async`], the PIO
//! copy kernel). The smallest size from which DMA is faster is where
//! [`LoaderConfig::pio_max_bytes`](crate::LoaderConfig::pio_max_bytes) should sit (finding 512: PIO
//! wins for small transfers). Run by `gpuio bench --target cuda:N --pio-sweep`.
//!
//! Both copies of every size are checked once (the bytes read back equal the source), so a sweep
//! cannot report the speed of a copy that does not work.

use std::sync::Arc;
use std::time::Instant;

use gpuio::mem::AlignedBuf;
use gpuio::{Error, ErrorKind, Result};

use crate::device::{Device, DeviceBuffer};

/// One transfer size.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    pub bytes: usize,
    /// Median microseconds per DMA copy (issue to completion).
    pub dma_us: f64,
    /// Median microseconds per PIO copy; `None` when the device has no PIO copy.
    pub pio_us: Option<f64>,
}

/// What a sweep found.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepResult {
    pub rows: Vec<SweepRow>,
    /// The smallest size from which DMA was faster than PIO at that and every larger size (None:
    /// PIO won at the largest size, or there is no PIO).
    pub dma_wins_from: Option<usize>,
    /// Why there is no PIO column, when there is none.
    pub pio_unavailable: Option<String>,
    pub repetitions: usize,
}

/// Sizes 64 B, 256 B, ... (× 4) up to `max` bytes.
pub fn sizes_up_to(max: usize) -> Vec<usize> {
    std::iter::successors(Some(64usize), |&s| s.checked_mul(4))
        .take_while(|&s| s <= max)
        .collect()
}

/// Times `reps` copies of each size (after a warm-up) both ways.
pub fn pio_dma_sweep(
    device: &Arc<dyn Device>,
    sizes: &[usize],
    reps: usize,
) -> Result<SweepResult> {
    let max = sizes.iter().copied().max().unwrap_or(0);
    if max == 0 || reps == 0 {
        return Err(Error::invalid(
            "a sweep needs sizes > 0 and at least one repetition",
        ));
    }
    let mut host = AlignedBuf::new(max, 4096)?;
    for (i, b) in host.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    // SAFETY: `host` outlives the pinning: unpinned below before it is dropped.
    let pinned = unsafe { device.pin_host(host.as_mut_ptr(), host.len()) }?;
    let result = sweep_pinned(device, &host, pinned.and_then(|p| p.mapped), sizes, reps);
    if pinned.is_some() {
        // SAFETY: pinned above; every copy was waited for.
        unsafe { device.unpin_host(host.as_mut_ptr(), host.len()) };
    }
    result
}

fn sweep_pinned(
    device: &Arc<dyn Device>,
    host: &AlignedBuf,
    mapped: Option<u64>,
    sizes: &[usize],
    reps: usize,
) -> Result<SweepResult> {
    let max = host.len();
    let dst = DeviceBuffer::alloc(device, max)?;
    let mut stream = device.copy_stream()?;
    let mut pio_unavailable = match mapped {
        Some(_) => None,
        None => Some("the pinned buffer is not mapped into the device's address space".to_string()),
    };
    let mut rows = Vec::with_capacity(sizes.len());
    let mut check = vec![0u8; max];
    for &n in sizes {
        // DMA: warm up, check once, time.
        let dma = |stream: &mut Box<dyn crate::CopyStream>| -> Result<()> {
            // SAFETY: host and dst live through the wait below.
            let t = unsafe { stream.copy_h2d_async(host.as_ptr(), n, dst.ptr()) }?;
            stream.wait(t)
        };
        let dma_us = time_median(reps, || dma(&mut stream))?;
        verify(&dst, host, n, &mut check, "DMA")?;
        let mut pio_us = None;
        if let (Some(m), None) = (mapped, &pio_unavailable) {
            // Clear the destination so the check sees the PIO copy's own bytes.
            let zeros = vec![0u8; n];
            // SAFETY: zeros lives through the wait.
            let t = unsafe { stream.copy_h2d_async(zeros.as_ptr(), n, dst.ptr()) }?;
            stream.wait(t)?;
            let pio = |stream: &mut Box<dyn crate::CopyStream>| -> Result<()> {
                // SAFETY: `m` is the device address of `host`, pinned and mapped; both live through
                // the wait.
                let t = unsafe { stream.copy_h2d_mapped_async(host.as_ptr(), m, n, dst.ptr()) }?;
                stream.wait(t)
            };
            match pio(&mut stream) {
                Ok(()) => {
                    verify(&dst, host, n, &mut check, "PIO")?;
                    pio_us = Some(time_median(reps, || pio(&mut stream))?);
                }
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    pio_unavailable = Some(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        rows.push(SweepRow {
            bytes: n,
            dma_us,
            pio_us,
        });
    }
    stream.synchronize()?;
    let dma_wins_from = crossover(&rows);
    Ok(SweepResult {
        rows,
        dma_wins_from,
        pio_unavailable,
        repetitions: reps,
    })
}

/// The smallest size from which DMA is faster at every larger size too (so one noisy small size does
/// not decide it).
fn crossover(rows: &[SweepRow]) -> Option<usize> {
    (0..rows.len())
        .find(|&i| {
            rows[i..]
                .iter()
                .all(|r| r.pio_us.is_some_and(|p| r.dma_us < p))
        })
        .map(|i| rows[i].bytes)
}

/// Median microseconds of `reps` calls of `f`, after `reps / 10 + 3` warm-up calls.
fn time_median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..reps / 10 + 3 {
        f()?;
    }
    let mut us = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    Ok(us[us.len() / 2])
}

fn verify(
    dst: &DeviceBuffer,
    host: &AlignedBuf,
    n: usize,
    check: &mut [u8],
    how: &str,
) -> Result<()> {
    dst.read(0, &mut check[..n])?;
    if check[..n] != host[..n] {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("the {how} copy of {n} bytes did not deliver the source bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostDevice, HostDeviceConfig};

    #[test]
    fn sizes_are_powers_of_four_from_64() {
        assert_eq!(sizes_up_to(1 << 10), vec![64, 256, 1024]);
        assert_eq!(sizes_up_to(1 << 20).len(), 8);
        assert!(sizes_up_to(63).is_empty());
    }

    #[test]
    fn the_crossover_is_where_dma_wins_for_good() {
        let row = |bytes, dma_us, pio_us: f64| SweepRow {
            bytes,
            dma_us,
            pio_us: Some(pio_us),
        };
        let rows = [
            row(64, 5.0, 3.0),
            row(256, 3.0, 4.0), // noise: DMA ahead once
            row(1024, 5.0, 4.0),
            row(4096, 5.0, 6.0),
            row(16384, 6.0, 9.0),
        ];
        assert_eq!(crossover(&rows), Some(4096));
        assert_eq!(
            crossover(&rows[..3]),
            None,
            "PIO still wins at the largest size"
        );
        assert_eq!(crossover(&[row(64, 1.0, 2.0)]), Some(64));
        let no_pio = SweepRow {
            bytes: 64,
            dma_us: 1.0,
            pio_us: None,
        };
        assert_eq!(crossover(&[no_pio]), None);
    }

    #[test]
    fn the_stand_in_sweeps_both_ways_and_checks_the_bytes() {
        let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig::default()));
        let r = pio_dma_sweep(&device, &sizes_up_to(64 << 10), 5).unwrap();
        assert_eq!(r.rows.len(), 6);
        assert!(r.pio_unavailable.is_none());
        assert!(r
            .rows
            .iter()
            .all(|row| row.dma_us > 0.0 && row.pio_us.is_some()));
    }

    #[test]
    fn without_mapping_there_is_no_pio_column_and_the_reason_is_given() {
        let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig {
            no_host_mapping: true,
            ..HostDeviceConfig::default()
        }));
        let r = pio_dma_sweep(&device, &[64, 4096], 3).unwrap();
        assert!(r.rows.iter().all(|row| row.pio_us.is_none()));
        assert_eq!(r.dma_wins_from, None);
        assert!(r.pio_unavailable.unwrap().contains("not mapped"));
    }

    #[test]
    fn a_failed_copy_fails_the_sweep_instead_of_timing_it() {
        // The 2nd copy fails: the sweep reports the error rather than a time.
        let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig {
            fail_copy_nth: Some(2),
            ..HostDeviceConfig::default()
        }));
        assert!(pio_dma_sweep(&device, &[64], 3).is_err());
    }
}
