//! Drives a backend directly, without the queue layer, with 4 KiB random reads at a fixed depth: the
//! floor the engine's own overhead is measured against.
//!
//! `cargo run --release --example raw_backend -- FILE [uring|threads|mmap] [QD] [SECS] [SUBMIT_BATCH]`

use std::time::{Duration, Instant};

use gpuio::backend::{self, BackendConfig, IoDone, IoKind, IoRequest, Span};
use gpuio::{AlignedBuf, BackendChoice, OpenOptions};

fn main() -> gpuio::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: raw_backend FILE [uring|threads|mmap] [QD] [SECS] [SUBMIT_BATCH]");
        std::process::exit(2);
    };
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let number = |i: usize, default: &str| -> gpuio::Result<f64> {
        arg(i, default)
            .parse()
            .map_err(|_| gpuio::Error::invalid(format!("argument {i} is not a number")))
    };
    let choice: BackendChoice = arg(2, "uring").parse()?;
    let qd = number(3, "64")? as usize;
    let secs = number(4, "4")?;
    let cfg = BackendConfig {
        choice,
        queue_depth: qd,
        submit_batch_max: number(5, &backend::SUBMIT_BATCH_DEFAULT.to_string())? as usize,
        ..BackendConfig::default()
    };
    let (mut be, explain) = backend::probe(&cfg)?;
    print!("{explain}");
    let file = OpenOptions::read().open(path)?;
    let blocks = (file.len()? / 4096).max(1);
    let mut bufs = (0..qd)
        .map(|_| AlignedBuf::new(4096, 4096))
        .collect::<Result<Vec<_>, _>>()?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_off = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D) % blocks * 4096
    };
    let push = |be: &mut Box<dyn backend::Backend>, tag: usize, ptr: *mut u8, offset: u64| {
        let req = IoRequest {
            kind: IoKind::Read(Span {
                ptr,
                len: 4096,
                fixed: None,
            }),
            file: file.clone(),
            direct: true,
            offset,
            tag: tag as u64,
        };
        // SAFETY: every buffer outlives the loop and carries one request at a time.
        unsafe { be.push(req) }.expect("a slot was just freed");
    };
    for (i, b) in bufs.iter_mut().enumerate() {
        push(&mut be, i, b.as_mut_ptr(), next_off());
    }
    let start = Instant::now();
    let (mut ops, mut reaps) = (0u64, 0u64);
    let mut done: Vec<IoDone> = Vec::new();
    while start.elapsed() < Duration::from_secs_f64(secs) {
        be.submit_and_reap(1, Some(Duration::from_millis(1)), &mut done)?;
        reaps += 1;
        for d in done.drain(..) {
            if d.result != 4096 {
                return Err(gpuio::Error::from_errno(
                    gpuio::error::Op::Read,
                    (-d.result) as i32,
                ));
            }
            ops += 1;
            let i = d.tag as usize;
            push(&mut be, i, bufs[i].as_mut_ptr(), next_off());
        }
    }
    while be.in_flight() > 0 {
        be.submit_and_reap(1, None, &mut done)?;
        done.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.0} IOPS, {:.1} completions per reap",
        ops as f64 / secs,
        ops as f64 / reaps.max(1) as f64
    );
    Ok(())
}
