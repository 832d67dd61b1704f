//! App health hooks: what an app on the device says about the version of
//! its model on probation. A hook is an `http://` URL (healthy: a 2xx
//! answer) or a shell command (healthy: exit status 0), given per model in
//! the agent's command line, and has a timeout.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// One model's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// `GET` this path on this `host:port`; healthy on a 2xx status.
    Http {
        /// Host and port, as in the URL.
        authority: String,
        /// Path and query.
        path: String,
    },
    /// Run through `/bin/sh -c`; healthy on exit status 0.
    Command(String),
}

/// `MODEL=http://HOST:PORT/PATH` or `MODEL=exec:COMMAND`, as given to `--health-hook`.
pub fn parse(arg: &str) -> Result<(String, Hook), String> {
    let (model, hook) = arg.split_once('=').ok_or("expected MODEL=http://HOST:PORT/PATH or MODEL=exec:COMMAND")?;
    if model.is_empty() {
        return Err("the model name is empty".into());
    }
    let hook = if let Some(rest) = hook.strip_prefix("http://") {
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("{hook:?}: the URL needs a host and a port (http://127.0.0.1:8080/healthz)"));
        }
        if path.contains(['\r', '\n', ' ']) {
            return Err(format!("{hook:?}: the path may not contain spaces or line breaks"));
        }
        Hook::Http { authority: authority.into(), path: path.into() }
    } else if let Some(cmd) = hook.strip_prefix("exec:") {
        if cmd.trim().is_empty() {
            return Err("the command is empty".into());
        }
        Hook::Command(cmd.into())
    } else {
        return Err(format!("{hook:?}: use http://HOST:PORT/PATH (https is not supported) or exec:COMMAND"));
    };
    Ok((model.into(), hook))
}

/// Most bytes of an answer's status line, or of a command's error output, kept.
const KEEP: usize = 200;

/// Asks `hook` about `model` at `version`: `Err` says why it is unhealthy.
pub async fn check(hook: &Hook, model: &str, version: u32, timeout: Duration) -> Result<(), String> {
    match hook {
        Hook::Http { authority, path } => {
            match tokio::time::timeout(timeout, get(authority, path, model, version)).await {
                Ok(r) => r,
                Err(_) => Err(format!("http://{authority}{path} did not answer within {} ms", timeout.as_millis())),
            }
        }
        Hook::Command(cmd) => {
            let (cmd, model) = (cmd.clone(), model.to_owned());
            tokio::task::spawn_blocking(move || run(&cmd, &model, version, timeout))
                .await
                .unwrap_or_else(|e| Err(format!("the hook's thread failed: {e}")))
        }
    }
}

async fn get(authority: &str, path: &str, model: &str, version: u32) -> Result<(), String> {
    let url = format!("http://{authority}{path}");
    let mut stream =
        tokio::net::TcpStream::connect(authority).await.map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tern-agent\r\nX-Tern-Model: {model}\r\nX-Tern-Version: {version}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("{url}: {e}"))?;
    // The status line is all that is read; the rest of the answer is not.
    let mut head = Vec::with_capacity(64);
    tokio::io::BufReader::new(stream.take(KEEP as u64))
        .read_until(b'\n', &mut head)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let line = String::from_utf8_lossy(&head).trim_end().to_string();
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer: {line:?}"))?;
    if (200..300).contains(&code) { Ok(()) } else { Err(format!("{url} answered {line:?}")) }
}

fn run(cmd: &str, model: &str, version: u32, timeout: Duration) -> Result<(), String> {
    // In a process group of its own: whatever it started in the background
    // is killed with it once it exits or times out.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .process_group(0)
        .env("TERN_MODEL", model)
        .env("TERN_VERSION", version.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let group = rustix::process::Pid::from_child(&child);
    let kill_group = || {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    };
    let status = loop {
        match child.try_wait().map_err(|e| format!("{cmd:?}: {e}"))? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                kill_group();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {} ms", timeout.as_millis()));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    // Nothing it left behind holds its stderr open past here.
    kill_group();
    if status.success() {
        return Ok(());
    }
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.by_ref().take(KEEP as u64).read_to_end(&mut err);
    }
    let said = String::from_utf8_lossy(&err).trim().to_string();
    let how = status.code().map_or_else(|| "was killed by a signal".to_string(), |c| format!("exited with {c}"));
    Err(if said.is_empty() { format!("{cmd:?} {how}") } else { format!("{cmd:?} {how}: {said}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse("cam=http://127.0.0.1:8080/healthz?deep=1").unwrap(),
            ("cam".into(), Hook::Http { authority: "127.0.0.1:8080".into(), path: "/healthz?deep=1".into() })
        );
        assert_eq!(parse("cam=exec:test -f /tmp/ok").unwrap(), ("cam".into(), Hook::Command("test -f /tmp/ok".into())));
        assert!(parse("cam=https://x:1/").unwrap_err().contains("https is not supported"));
        assert!(parse("cam=http://localhost/").unwrap_err().contains("host and a port"));
        assert!(parse("=exec:true").is_err());
        assert!(parse("cam").is_err());
    }

    #[tokio::test]
    async fn a_command_hook_passes_on_zero_and_says_why_otherwise() {
        let t = Duration::from_secs(5);
        let ok = Hook::Command("test \"$TERN_MODEL:$TERN_VERSION\" = cam:3".into());
        assert_eq!(check(&ok, "cam", 3, t).await, Ok(()));
        assert_eq!(
            check(&ok, "cam", 4, t).await.unwrap_err(),
            "\"test \\\"$TERN_MODEL:$TERN_VERSION\\\" = cam:3\" exited with 1"
        );
        let said = Hook::Command("echo lens covered >&2; exit 3".into());
        assert!(check(&said, "cam", 1, t).await.unwrap_err().ends_with("exited with 3: lens covered"));
        // A background child holding stderr open does not hang the check.
        let left = Hook::Command("sleep 30 & echo bye >&2; exit 2".into());
        let started = Instant::now();
        assert!(check(&left, "cam", 1, t).await.unwrap_err().ends_with("exited with 2: bye"));
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let slow = Hook::Command("sleep 5".into());
        let started = Instant::now();
        let e = check(&slow, "cam", 1, Duration::from_millis(100)).await.unwrap_err();
        assert!(e.ends_with("did not finish within 100 ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "killed at its timeout");
    }

    #[tokio::test]
    async fn an_http_hook_passes_on_2xx_and_says_why_otherwise() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer = match req.split_whitespace().nth(1) {
                    Some("/ok") if req.contains("X-Tern-Model: cam\r\n") && req.contains("X-Tern-Version: 2\r\n") => {
                        "HTTP/1.1 204 No Content\r\n\r\n"
                    }
                    Some("/silent") => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        ""
                    }
                    Some("/junk") => "hello\r\n",
                    _ => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                };
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let t = Duration::from_millis(500);
        let hook = |path: &str| Hook::Http { authority: addr.to_string(), path: path.into() };
        assert_eq!(check(&hook("/ok"), "cam", 2, t).await, Ok(()));
        let e = check(&hook("/down"), "cam", 2, t).await.unwrap_err();
        assert!(e.ends_with("answered \"HTTP/1.1 503 Service Unavailable\""), "{e}");
        assert!(check(&hook("/junk"), "cam", 2, t).await.unwrap_err().contains("not an HTTP answer"));
        let e = check(&hook("/silent"), "cam", 2, t).await.unwrap_err();
        assert!(e.ends_with("did not answer within 500 ms"), "{e}");
        let closed = Hook::Http { authority: "127.0.0.1:1".into(), path: "/".into() };
        assert!(check(&closed, "cam", 2, t).await.unwrap_err().contains("cannot connect"));
    }
}
