//! Drives a backend directly (no queue layer) with 4 KiB random reads, to separate backend cost from
//! queue-layer cost: `cargo run --release --example raw_backend -- FILE [uring|threads] [QD] [SECS]`.

use std::time::{Duration, Instant};

use gpuio::backend::{self, BackendConfig, IoDone, IoOp, IoRequest};
use gpuio::{AlignedBuf, BackendChoice, OpenOptions};

fn main() -> gpuio::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: raw_backend FILE [uring|threads] [QD] [SECS]");
    let choice: BackendChoice = args.get(2).map_or("uring", |s| s.as_str()).parse()?;
    let qd: usize = args.get(3).map_or(64, |s| s.parse().expect("QD"));
    let secs: f64 = args.get(4).map_or(4.0, |s| s.parse().expect("SECS"));
    let cfg = BackendConfig {
        choice,
        queue_depth: qd,
        registered_files: std::env::var("NOREG").is_err(),
        ..BackendConfig::default()
    };
    let timeout = if std::env::var("NOTIMEOUT").is_ok() {
        None
    } else {
        Some(Duration::from_millis(1))
    };
    let (mut be, explain) = backend::probe(&cfg)?;
    print!("{explain}");
    let file = OpenOptions::read().open(path)?;
    let blocks = file.len()? / 4096;
    let mut bufs: Vec<AlignedBuf> = (0..qd)
        .map(|_| AlignedBuf::new(4096, 4096))
        .collect::<Result<_, _>>()?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_off = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D) % blocks * 4096
    };
    let push = |be: &mut Box<dyn backend::Backend>, tag: usize, ptr: *mut u8, off: u64| {
        let req = IoRequest {
            op: IoOp::Read,
            file: file.clone(),
            direct: true,
            offset: off,
            ptr,
            len: 4096,
            fixed: None,
            tag: tag as u64,
        };
        // SAFETY: bufs outlive the loop and each buffer has one request at a time.
        unsafe { be.push(req) }.expect("room");
    };
    for (i, b) in bufs.iter_mut().enumerate() {
        push(&mut be, i, b.as_mut_ptr(), next_off());
    }
    let start = Instant::now();
    let mut ops = 0u64;
    let mut done: Vec<IoDone> = Vec::new();
    let mut loops = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        be.submit_and_reap(1, timeout, &mut done)?;
        loops += 1;
        let k: usize = std::env::var("XK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        let mut pushed = 0;
        let mut extra = Vec::new();
        for d in done.drain(..) {
            assert_eq!(d.result, 4096);
            ops += 1;
            let i = d.tag as usize;
            push(&mut be, i, bufs[i].as_mut_ptr(), next_off());
            pushed += 1;
            if pushed % k == 0 {
                be.submit_and_reap(0, None, &mut extra)?;
            }
        }
        done.append(&mut extra);
    }
    let mut sink = Vec::new();
    while be.in_flight() > 0 {
        be.submit_and_reap(1, None, &mut sink)?;
        sink.clear();
    }
    println!(
        "{:.0} IOPS, {:.1} completions per reap",
        ops as f64 / start.elapsed().as_secs_f64(),
        ops as f64 / loops as f64
    );
    Ok(())
}
