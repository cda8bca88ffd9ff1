//! External programs (nft, iptables, tc), each with a time limit: a tool
//! that hangs (a stuck xtables lock, a broken build) costs one request an
//! error, never the daemon its progress.

use std::{
    io::{Read, Write},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Milliseconds a program may run (config `command_timeout_secs`).
static LIMIT_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets the limit for every program run from now on.
pub fn set_limit(limit: Duration) {
    LIMIT_MS.store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
}

pub fn limit() -> Duration {
    Duration::from_millis(LIMIT_MS.load(Ordering::Relaxed))
}

/// Runs `cmd` with `input` on its stdin, collecting its output. A program
/// still running at the limit is killed (it is our child, by its PID) and
/// the run fails with an error that says so.
pub fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<Output> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        // Its own process group, so that what it started dies with it.
        .process_group(0)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {name} (is it installed?)"))?;
    let pidfd = pidfd(child.id()).with_context(|| format!("watching {name}"))?;
    let (stdin, mut stdout, mut stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let limit = limit();
    // Pipes are fed and drained on their own threads, so a child that
    // neither reads nor exits cannot block us past the limit.
    let (exited, out, err) = std::thread::scope(|s| {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            s.spawn(move || {
                let _ = stdin.write_all(input);
            });
        }
        let out = s.spawn(move || drain(stdout.as_mut()));
        let err = s.spawn(move || drain(stderr.as_mut()));
        let exited = wait_readable(&pidfd, limit);
        if !exited.as_ref().is_ok_and(|e| *e) {
            // Killing the group closes its pipes, which ends the threads
            // above; the group is the child's own (set at spawn).
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        }
        (exited, out.join().unwrap_or_default(), err.join().unwrap_or_default())
    });
    let status = child.wait().with_context(|| format!("waiting for {name}"))?;
    match exited {
        Ok(true) => Ok(Output { status, stdout: out, stderr: err }),
        Ok(false) => bail!("{name} did not finish within {} s (command_timeout_secs); it was killed", limit.as_secs_f64()),
        Err(e) => Err(e).with_context(|| format!("waiting for {name}")),
    }
}

/// As [`run`], failing unless the program exits with success; the error
/// carries its stderr.
pub fn check(cmd: &mut Command, input: Option<&[u8]>) -> Result<Output> {
    let out = run(cmd, input)?;
    succeeded(&cmd.get_program().to_string_lossy(), out)
}

/// `out` of program `name` if it exited with success; else an error that
/// carries its stderr.
pub fn succeeded(name: &str, out: Output) -> Result<Output> {
    if !out.status.success() {
        bail!("{name} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn drain(pipe: Option<&mut impl Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.read_to_end(&mut buf);
    }
    buf
}

fn pidfd(pid: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open (Linux 5.3+)");
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process exited within `limit` (its pidfd becomes readable).
fn wait_readable(fd: &OwnedFd, limit: Duration) -> Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_exit_status_come_back() {
        let out = run(Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]), Some(b"hello")).unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
        let e = check(Command::new("sh").args(["-c", "echo nope >&2; exit 1"]), None).unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
    }

    #[test]
    fn a_program_that_hangs_is_killed_at_the_limit() {
        set_limit(Duration::from_millis(300));
        let t = std::time::Instant::now();
        // One that ignores its stdin, and whose own child keeps the pipes
        // open.
        let e = run(Command::new("sh").args(["-c", "sleep 30; true"]), Some(&[0u8; 1 << 20])).unwrap_err();
        set_limit(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(format!("{e:#}").contains("did not finish"), "{e:#}");
    }
}
