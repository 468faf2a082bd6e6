//! Page-cache settings shared by [`crate::bfs`] and [`crate::gather`]: the cache's size (bytes or a
//! percentage of the file), the checks of line size, queue depth and coalescing (errors name the CLI
//! flags and their bounds), and the engine a cache runs on. Never prints.

use gpuio::{Engine, EngineConfig, Error, MemoryBudget, Result};

/// Default cache size: this percentage of the file the cache is over.
pub const CACHE_PERCENT_DEFAULT: f64 = 20.0;
/// A default (percentage) cache is never smaller than this many lines.
pub const CACHE_LINES_MIN_DEFAULT: u64 = 64;
/// Smallest and largest cache line (`gpuio_cache::CacheConfig::line_bytes` accepts these powers of two).
pub const LINE_BYTES_MIN: u64 = 512;
/// See [`LINE_BYTES_MIN`].
pub const LINE_BYTES_MAX: u64 = 65536;

/// `--cache-size`: bytes, or a percentage of the file the cache is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    Bytes(u64),
    Percent(f64),
}

/// Parses `256M`, `1G`, `4096` or `20%`.
pub fn parse_cache_size(s: &str) -> std::result::Result<CacheSize, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a percentage (example: 20%)"))?;
        if !(v > 0.0 && v <= 100.0) {
            return Err(format!("'{s}': a percentage must be in (0, 100]"));
        }
        return Ok(CacheSize::Percent(v));
    }
    gpuio::size::parse_size(s)
        .map(CacheSize::Bytes)
        .map_err(|e| e.to_string())
}

/// The cache's capacity for a file of `file_bytes`: `size`, or by default 20% of the file (at least
/// 64 lines); never more than the lines the file has (a larger cache could not be used). Fails when
/// the cache would be smaller than one line.
pub fn cache_bytes(size: Option<CacheSize>, file_bytes: u64, line: u64) -> Result<u64> {
    let bytes = match size {
        Some(CacheSize::Bytes(b)) => b,
        Some(CacheSize::Percent(p)) => (file_bytes as f64 * p / 100.0) as u64,
        None => ((file_bytes as f64 * CACHE_PERCENT_DEFAULT / 100.0) as u64)
            .max(CACHE_LINES_MIN_DEFAULT * line),
    };
    if bytes < line {
        return Err(Error::invalid(format!(
            "--cache-size {} is smaller than one cache line ({}): give at least --line-size bytes",
            match size {
                Some(CacheSize::Percent(p)) => format!("{p}% ({bytes} bytes)"),
                _ => format!("{bytes} bytes"),
            },
            line
        )));
    }
    Ok(bytes.min(file_bytes.div_ceil(line).max(1) * line))
}

/// An engine for a cache of `capacity` bytes at queue depth `qd`.
pub fn cache_engine(qd: usize, capacity: u64) -> Result<Engine> {
    if qd == 0 || qd > gpuio::backend::QUEUE_DEPTH_MAX {
        return Err(Error::invalid(format!(
            "--queue-depth {qd} is out of range 1..={}",
            gpuio::backend::QUEUE_DEPTH_MAX
        )));
    }
    let mut cfg = EngineConfig::default();
    cfg.backend.queue_depth = qd;
    // Room for the cache's lines besides the engine's own buffers, should the cache charge them here.
    cfg.memory_budget = MemoryBudget::new((4u64 << 30).max(capacity.saturating_add(1 << 30)));
    Engine::new(cfg)
}

/// Checks the page-cache settings shared by `bfs` and `gather` before anything uses them, naming each
/// flag and its bounds: `--line-size` a power of two in 512..=65536, `--queue-depth` in
/// 1..=`QUEUE_DEPTH_MAX`, `--coalesce` at most `COALESCE_BYTES_MAX`.
pub fn validate_cache_flags(
    line_size: u64,
    queue_depth: usize,
    coalesce: u64,
    issue_threads: usize,
) -> Result<()> {
    if !line_size.is_power_of_two() || !(LINE_BYTES_MIN..=LINE_BYTES_MAX).contains(&line_size) {
        return Err(Error::invalid(format!(
            "--line-size {line_size} must be a power of two in {LINE_BYTES_MIN}..={LINE_BYTES_MAX} (512, 1K, ... 64K)"
        )));
    }
    if queue_depth == 0 || queue_depth > gpuio::backend::QUEUE_DEPTH_MAX {
        return Err(Error::invalid(format!(
            "--queue-depth {queue_depth} is out of range 1..={}",
            gpuio::backend::QUEUE_DEPTH_MAX
        )));
    }
    if coalesce > gpuio_cache::COALESCE_BYTES_MAX as u64 {
        return Err(Error::invalid(format!(
            "--coalesce {coalesce} is out of range 0..={} (4M)",
            gpuio_cache::COALESCE_BYTES_MAX
        )));
    }
    if issue_threads > gpuio_cache::ISSUE_THREADS_MAX {
        return Err(Error::invalid(format!(
            "--issue-threads {issue_threads} is out of range 0..={}",
            gpuio_cache::ISSUE_THREADS_MAX
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_size_parsing() {
        assert_eq!(parse_cache_size("20%"), Ok(CacheSize::Percent(20.0)));
        assert_eq!(parse_cache_size("4K"), Ok(CacheSize::Bytes(4096)));
        assert!(parse_cache_size("0%").is_err());
        assert!(parse_cache_size("101%").is_err());
        assert!(parse_cache_size("x%").is_err());
    }

    #[test]
    fn cache_never_exceeds_the_file() {
        assert_eq!(cache_bytes(None, 1 << 20, 4096).unwrap(), 64 * 4096);
        assert_eq!(
            cache_bytes(Some(CacheSize::Bytes(1 << 30)), 10_000, 4096).unwrap(),
            3 * 4096
        );
        assert!(cache_bytes(Some(CacheSize::Bytes(100)), 1 << 20, 4096).is_err());
    }
}
