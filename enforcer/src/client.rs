//! The CLI's side of the control API: it needs only `api`, so a program
//! that drives enforcer can use it without the daemon's code.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result};

use crate::api::{ApiError, Reply, Request, Response};

/// Sends `req` and reads the daemon's answer; the connection stays open
/// for what may follow it (an event stream).
fn send(socket: &Path, req: &Request) -> Result<(BufReader<UnixStream>, Response)> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the daemon at {} (is `enforcer daemon` running?)", socket.display()))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).context("reading the daemon's answer")?;
    let response: Response = serde_json::from_str(&answer).with_context(|| format!("bad answer from daemon: {answer:?}"))?;
    Ok((reader, response))
}

/// Sends a streaming request (`events`): returns the daemon's refusal, or
/// calls `each` with every line that follows until the daemon closes the
/// connection or `each` says stop.
pub fn stream(socket: &Path, req: &Request, mut each: impl FnMut(&str) -> Result<bool>) -> Result<Result<(), ApiError>> {
    let (reader, response) = send(socket, req)?;
    if let Response::Error(e) = response {
        return Ok(Err(e));
    }
    for line in reader.lines() {
        if !each(&line.context("reading from the daemon")?)? {
            break;
        }
    }
    Ok(Ok(()))
}

/// Sends one request and waits for its response. The outer error is a
/// transport failure; the inner one is the daemon's answer.
pub fn call(socket: &Path, req: &Request) -> Result<Result<Reply, ApiError>> {
    Ok(send(socket, req)?.1.into())
}
