//! Range checks for the loaders' configuration knobs, with errors that name the knob and its range.

use gpuio::{Error, Result};

/// Chunk sizes are multiples of this (the OS page), so chunk offsets stay page-aligned.
const CHUNK_ALIGN: usize = 4096;

/// `what` must be in `1..=max`.
pub(crate) fn check_count(what: &str, n: usize, max: usize) -> Result<()> {
    if (1..=max).contains(&n) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {n} is out of range 1..={max}"
        )))
    }
}

/// `what` must be a multiple of 4096 in `min..=max`.
pub(crate) fn check_chunk_size(what: &str, b: usize, min: usize, max: usize) -> Result<()> {
    if (min..=max).contains(&b) && b % CHUNK_ALIGN == 0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {b} must be a multiple of 4096 in {min}..={max}"
        )))
    }
}
