//! Standard output that cannot be written, for every subcommand: a full device (`> /dev/full`) ends
//! the command with exit status 1 and one line naming the cause; a reader that went away (a closed
//! pipe) ends it quietly by SIGPIPE, as coreutils' commands end (see crates/gpuio-cli/src/out.rs).
//! Neither panics, and neither leaves a temporary or scratch file behind.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::gpuio_in;

/// A directory with an input of every kind the subcommands read, and the argument lists that run
/// each subcommand successfully (each prints something on standard output).
struct Fixture {
    dir: tempfile::TempDir,
    tmp: PathBuf,
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A safetensors file of one U8 tensor of 64 bytes.
fn safetensors(p: &Path) {
    let mut header = br#"{"t":{"dtype":"U8","shape":[64],"data_offsets":[0,64]}}"#.to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend((0..64u8).map(|i| i.wrapping_mul(7)));
    std::fs::write(p, bytes).unwrap();
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("f.bin"), vec![5u8; 1 << 20]).unwrap();
        std::fs::write(d.join("table.bin"), vec![1u8; 1 << 20]).unwrap();
        safetensors(&d.join("m.safetensors"));
        let tmp = d.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let f = Fixture { dir, tmp };
        let (input, pack, graph) = (f.p("f.bin"), f.p("p.gpk"), f.p("g"));
        for setup in [
            vec!["pack", &input, "-o", &pack],
            vec!["graph", "gen", "--scale", "6", "-o", &graph],
        ] {
            let out = gpuio_in(&f.tmp, &setup);
            assert!(out.status.success(), "{setup:?}: {out:?}");
        }
        f
    }

    fn p(&self, name: &str) -> String {
        path(self.dir.path(), name)
    }

    /// One successful run of every subcommand (`n` keeps outputs of different runs apart).
    fn runs(&self, n: usize) -> Vec<Vec<String>> {
        let f = self.p("f.bin");
        let pack_entry = format!("{}:f.bin", self.p("p.gpk"));
        let runs: Vec<Vec<String>> = vec![
            vec![
                "bench",
                "--size",
                "4M",
                "--pattern",
                "read",
                "--duration",
                "0.2",
                "--json",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec!["info".into()],
            vec!["info".into(), self.p("p.gpk"), "--json".into()],
            vec!["cat".into(), f.clone()],
            vec!["cat".into(), pack_entry.clone()],
            vec![
                "pack".into(),
                f.clone(),
                "-o".into(),
                self.p(&format!("out{n}.gpk")),
            ],
            vec![
                "unpack".into(),
                self.p("p.gpk"),
                "-o".into(),
                self.p(&format!("unpacked{n}")),
            ],
            vec!["verify".into(), self.p("p.gpk")],
            vec![
                "graph".into(),
                "gen".into(),
                "--scale".into(),
                "5".into(),
                "-o".into(),
                self.p(&format!("g{n}")),
            ],
            vec![
                "bfs".into(),
                self.p("g"),
                "--source".into(),
                "1".into(),
                "--depths-out".into(),
                self.p(&format!("depths{n}")),
            ],
            vec![
                "gather".into(),
                "--table".into(),
                self.p("table.bin"),
                "--row-bytes".into(),
                "4096".into(),
                "--batch".into(),
                "4".into(),
                "--batches".into(),
                "2".into(),
            ],
            vec!["cp".into(), f.clone(), self.p(&format!("copy{n}.bin"))],
            vec![
                "stream".into(),
                "--input".into(),
                f.clone(),
                "--output".into(),
                self.p(&format!("streamed{n}.bin")),
            ],
            vec!["checksum".into(), f.clone()],
            vec!["checksum".into(), pack_entry],
            // CPU producers through the rings on the host stand-in (a GPU's kernels elsewhere).
            vec![
                "rings".into(),
                self.p("table.bin"),
                "--device".into(),
                "cpu".into(),
                "--reads".into(),
                "256".into(),
                "--threads".into(),
                "8".into(),
            ],
            vec![
                "load".into(),
                self.p("m.safetensors"),
                "--device".into(),
                "cpu".into(),
                "--save-to".into(),
                self.p(&format!("saved{n}.safetensors")),
            ],
        ];
        // Every subcommand is here (graph counts through `graph gen`).
        let help = gpuio_in(&self.tmp, &["--help"]);
        let text = String::from_utf8_lossy(&help.stdout).into_owned();
        let commands = text
            .split("Commands:")
            .nth(1)
            .expect("a command list")
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .take_while(|w| !w.ends_with(':'))
            .filter(|w| *w != "help")
            .map(String::from)
            .collect::<Vec<_>>();
        assert!(commands.len() >= 13, "{text}");
        for c in &commands {
            assert!(runs.iter().any(|r| &r[0] == c), "no run of {c}");
        }
        runs
    }

    /// Temporary files anywhere under the fixture (`.NAME.PID-RAND.tmp`) and anything in the scratch
    /// directory (bench's scratch file).
    fn leftovers(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    walk(&p, out);
                } else if name.starts_with('.') && name.ends_with(".tmp") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out.extend(
            std::fs::read_dir(&self.tmp)
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
        out
    }

    fn run_with_stdout(&self, args: &[String], stdout: Stdio) -> Output {
        Command::new(env!("CARGO_BIN_EXE_gpuio"))
            .args(args)
            .env("TMPDIR", &self.tmp)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .expect("run gpuio")
    }
}

#[test]
fn a_full_stdout_is_one_line_and_exit_1_for_every_subcommand() {
    let fx = Fixture::new();
    // Each run succeeds with stdout to /dev/null: the failures below are stdout's.
    for args in fx.runs(0) {
        let out = fx.run_with_stdout(&args, Stdio::null());
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    for args in fx.runs(1) {
        if args[0] == "unpack" {
            continue; // prints its summary on standard error: nothing to fail on standard output
        }
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = fx.run_with_stdout(&args, Stdio::from(full));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(
            err, "gpuio: error: writing standard output: No space left on device\n",
            "{args:?}"
        );
        assert!(fx.leftovers().is_empty(), "{args:?}: {:?}", fx.leftovers());
    }
}

#[test]
fn a_closed_pipe_ends_every_subcommand_quietly_by_sigpipe() {
    let fx = Fixture::new();
    for args in fx.runs(2) {
        if args[0] == "unpack" {
            continue; // writes nothing on standard output
        }
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors into a live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the two descriptors pipe(2) just made, each owned by one OwnedFd.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read_end); // the reader is gone before the command writes anything
        let out = fx.run_with_stdout(&args, Stdio::from(write_end));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {out:?}"
        );
        assert!(err.is_empty(), "{args:?}: quiet, but said: {err}");
        assert!(fx.leftovers().is_empty(), "{args:?}: {:?}", fx.leftovers());
    }
}
