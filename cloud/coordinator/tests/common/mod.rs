//! Real `tern serve` and `tern-agent` processes on loopback, for the
//! end-to-end tests. Every process is SIGKILLed when its handle drops.

#![allow(dead_code)]

pub mod attack;

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tern_net::{FrameReader, write_msg};
use tern_proto::{Message, WireVersion};

/// Numbers log files, so that two starts of one process never share one.
static LOGS: AtomicUsize = AtomicUsize::new(0);

/// A figure of `/proc/PID/status` (`VmRSS`, `VmHWM`, `Threads`...).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// The most resident memory a process has had, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmHWM")
}

/// A coordinator, and an agent `cam-01` started with `extra` flags and
/// serving `fixture_name` as `name:1`.
pub fn serving(extra: &[&str], fixture_name: &str, name: &str) -> (Coord, Agent) {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_fixture(name, fixture_name);
    coord.ok(&["fleet", "assign", "cam-01", &format!("{name}:1")]);
    agent.start_with(extra);
    agent.wait_serving(name, 1);
    (coord, agent)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// `TERN_TEST_BIN_DIR` runs the tests against other builds of `tern` and
/// `tern-agent` (an older release, say, to see which tests it fails).
fn bin_dir() -> PathBuf {
    match std::env::var_os("TERN_TEST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_BIN_EXE_tern")).parent().unwrap().to_path_buf(),
    }
}

pub fn tern_bin() -> PathBuf {
    bin_dir().join("tern")
}

pub fn agent_bin() -> PathBuf {
    let p = bin_dir().join("tern-agent");
    assert!(p.is_file(), "{} is missing: build it first (cargo build -p tern-agent, or scripts/test)", p.display());
    p
}

/// xorshift64*: instants and choices a test draws, the same for a seed
/// every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The version of `scorer` that answered and its scores for
/// x = [0.1, 0.7, 0.2, 0]: scorer-a gives x[0..3], scorer-a2 twice that.
pub fn scorer_answer(agent: &Agent) -> Option<(u64, Vec<f64>)> {
    let (status, v) = agent.post("/v1/models/scorer:predict", r#"{"inputs":[{"shape":[1,4],"data":[0.1,0.7,0.2,0]}]}"#);
    (status == 200).then(|| {
        let scores = v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        (v["version"].as_u64().unwrap(), scores)
    })
}

/// Debian's libfaketime, which scripts/test installs.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment that runs a dynamically linked program at `at`
/// (libfaketime's FAKETIME: "+2d", "@1970-01-02 00:00:00"), with
/// `Instant` left honest.
pub fn faketime(at: &str) -> Vec<(String, String)> {
    assert!(Path::new(LIBFAKETIME).exists(), "{LIBFAKETIME} is missing: install Debian's faketime (scripts/test does)");
    vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), at.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// The agent built as devices run it where a test needs it: a panic ends
/// the process (`cargo build -p tern-agent --profile abort`).
pub fn abort_agent_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/abort/tern-agent");
    assert!(p.is_file(), "{} is missing: cargo build -p tern-agent --profile abort (scripts/test does)", p.display());
    p
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process, SIGKILLed on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Proc {
    spawn_env(bin, args, log, &[])
}

fn spawn_env(bin: &Path, args: &[&str], log: &Path, env: &[(String, String)]) -> Proc {
    spawn_through(&[], bin, args, log, env)
}

/// `bin` run through `prefix` (a command that execs it: `prlimit …`,
/// `ip netns exec …`), so that the child's pid is the program's own.
fn spawn_through(prefix: &[String], bin: &Path, args: &[&str], log: &Path, env: &[(String, String)]) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(args)
        .env("RUST_LOG", "debug,quinn=warn,quinn_proto=warn,rustls=warn,sled=warn,tract=warn,tract_core=warn,tract_hir=warn,tract_onnx=warn,hyper=warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// A running coordinator with its own data dir.
pub struct Coord {
    pub dir: tempfile::TempDir,
    pub proc: Proc,
    pub quic: String,
    pub admin: String,
    /// The embedded MQTT broker's address, if one runs.
    pub mqtt: Option<String>,
}

impl Coord {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A coordinator with extra `tern serve` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
            .unwrap_or_else(|(_, log)| panic!("coordinator failed: {log}"))
    }

    /// Starts `tern serve` on `dir` (which may hold the data dir of an earlier
    /// run); `Err` with the folder and its log if it exits instead.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Result<Self, (tempfile::TempDir, String)> {
        Self::start_in_env(dir, extra, &[])
    }

    /// The same, with `env` added to the coordinator's environment.
    pub fn start_in_env(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Self, (tempfile::TempDir, String)> {
        let data = dir.path().join("data");
        let _ = std::fs::remove_file(data.join("serve.json"));
        let mut args = vec!["serve", "--data-dir", data.to_str().unwrap(), "--admin-listen", "127.0.0.1:0"];
        if !extra.contains(&"--quic-listen") {
            args.extend(["--quic-listen", "127.0.0.1:0"]);
        }
        // Builds from before the embedded broker lack the flag.
        let own = std::env::var_os("TERN_TEST_BIN_DIR").is_none();
        if own && !extra.contains(&"--mqtt-listen") && !extra.contains(&"--mqtt-url") {
            args.extend(["--mqtt-listen", "127.0.0.1:0"]);
        }
        // Probation of 1 s (not the default minute), so that a test can wait
        // for each update to commit; builds from before staged updates lack
        // the flag.
        let policy = dir.path().join("update-policy.toml");
        let policy_arg = policy.to_str().unwrap().to_owned();
        if !extra.contains(&"--update-policy") && std::env::var_os("TERN_TEST_BIN_DIR").is_none() {
            std::fs::write(&policy, "probation_secs = 1\n").unwrap();
            args.extend(["--update-policy", &policy_arg]);
        }
        args.extend_from_slice(extra);
        let n = LOGS.fetch_add(1, Ordering::Relaxed);
        let log = dir.path().join(format!("coordinator-{n}.log"));
        let mut proc = spawn_env(&tern_bin(), &args, &log, env);
        let ep: Value = wait_for("coordinator start", Duration::from_secs(20), || {
            if proc.exited().is_some() {
                return Some(Value::Null);
            }
            serde_json::from_slice(&std::fs::read(data.join("serve.json")).ok()?).ok()
        });
        if ep.is_null() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err((dir, log));
        }
        Ok(Self {
            quic: ep["quic"].as_str().unwrap().to_owned(),
            admin: format!("http://{}", ep["admin"].as_str().unwrap()),
            mqtt: ep["mqtt"].as_str().map(str::to_owned),
            dir,
            proc,
        })
    }

    /// Stops it with SIGTERM (it closes its connections, so agents
    /// reconnect at once) and hands back its folder.
    pub fn stop_gently(mut self) -> tempfile::TempDir {
        let _ = Command::new("kill").args(["-TERM", &self.proc.pid().to_string()]).status();
        wait_for("the coordinator to exit", Duration::from_secs(20), || self.proc.exited());
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Stops it (SIGKILL) and hands back its folder.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.proc.kill9();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Every log this folder's coordinators wrote.
    pub fn log(&self) -> String {
        logs_in(self.dir.path())
    }

    /// GETs an admin API path with the admin token: status and body.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut resp = agent
            .get(format!("{}{path}", self.admin))
            .header("authorization", format!("Bearer {}", self.admin_token()))
            .call()
            .unwrap();
        (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data().join("admin.token")).unwrap().trim().to_owned()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tern_bin()).arg("--data-dir").arg(self.data()).args(args).output().unwrap()
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "tern {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "tern {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn token(&self) -> String {
        self.ok(&["fleet", "token", "--group", "lab", "--profile", "rpi4"]).trim().to_owned()
    }

    /// Registers and approves a fixture; returns the version.
    pub fn register_fixture(&self, name: &str, file: &str) -> u64 {
        let v = self.json(&["model", "register", name, "--file", fixture(file).to_str().unwrap()]);
        let version = v["version"].as_u64().unwrap();
        self.ok(&["model", "approve", &format!("{name}:{version}")]);
        version
    }

    /// Registers and approves fixtures/iris.onnx; returns the version.
    pub fn register_iris(&self, name: &str) -> u64 {
        let v = self.json(&[
            "model",
            "register",
            name,
            "--file",
            fixture("iris.onnx").to_str().unwrap(),
            "--meta",
            "dataset=iris",
        ]);
        let version = v["version"].as_u64().unwrap();
        self.ok(&["model", "approve", &format!("{name}:{version}")]);
        version
    }

    pub fn device(&self, id: &str) -> Value {
        self.json(&["fleet", "list"]).as_array().unwrap().iter().find(|d| d["id"] == id).cloned().unwrap_or(Value::Null)
    }

    /// Waits until device `id` has said, in a session of wire `version` or
    /// later, what its agent can do.
    pub fn wait_wire_version(&self, id: &str, version: u16) {
        wait_for(&format!("{id}'s capabilities"), Duration::from_secs(10), || {
            (self.device(id)["capabilities"]["wire_version"].as_u64()? >= u64::from(version)).then_some(())
        });
    }

    /// `GET /v1/status`: connections, anonymous connections, sessions.
    pub fn status(&self) -> Value {
        ureq::get(format!("{}/v1/status", self.admin))
            .header("authorization", format!("Bearer {}", self.admin_token()))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    }
}

fn logs_in(dir: &Path) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
}

/// A device's own QUIC client, speaking the protocol by hand with the
/// identity an agent got at enrollment: for tests that play a device the
/// agent would never be (an old one, a clone, a hostile one).
pub struct RawDevice {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub version: WireVersion,
}

impl RawDevice {
    /// Connects with `agent`'s certificate, offering `versions`.
    pub async fn connect(coord: &Coord, agent: &Agent, versions: &[WireVersion]) -> anyhow::Result<Self> {
        let id = agent.data().join("identity");
        let read = |n: &str| std::fs::read(id.join(n)).unwrap();
        let config = tern_net::device_client_config_speaking(
            &read("ca.crt"),
            &read("device.crt"),
            &read("device.key"),
            versions,
        )?;
        let addr: std::net::SocketAddr = coord.quic.parse().unwrap();
        let endpoint = tern_net::client_endpoint(addr)?;
        let conn = endpoint.connect_with(config, addr, tern_net::COORDINATOR_NAME)?.await?;
        let version = tern_net::wire_version(&conn)?;
        Ok(Self { endpoint, conn, version })
    }

    /// Opens a stream, sends `msg`, and reads the first answer.
    pub async fn ask(&self, msg: &Message) -> anyhow::Result<(quinn::SendStream, FrameReader, Option<Message>)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_msg(&mut send, msg, self.version).await?;
        let mut reader = FrameReader::new(recv, self.version);
        let first = tokio::time::timeout(Duration::from_secs(10), reader.next()).await??;
        Ok((send, reader, first))
    }
}

/// A `Hello` as the current agent sends it.
pub fn hello(agent_version: &str) -> Message {
    Message::Hello(tern_proto::Hello {
        agent_version: agent_version.into(),
        models: vec![],
        wire_versions: WireVersion::SUPPORTED.iter().map(|v| v.0).collect(),
        formats: vec![tern_proto::ModelFormat::Onnx, tern_proto::ModelFormat::Nnef],
        backends: vec!["tract-nnef".into()],
    })
}

/// The desired state a message carries, signed (wire 4 on) or not.
pub fn desired_of(msg: Option<Message>) -> Option<tern_proto::DesiredState> {
    match msg? {
        Message::Desired(d) => Some(d),
        Message::SignedDesired(s) => Some(s.state),
        _ => None,
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An agent's data dir and, once started, its process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
    pub http: String,
    pub socket: PathBuf,
    /// Environment the next start adds (TZ, say).
    pub env: Vec<(String, String)>,
    /// A command the next start runs the agent through (it must exec it).
    pub prefix: Vec<String>,
    /// The local API's address for the next start (default 127.0.0.1:0).
    pub listen: String,
    /// Another agent binary for the next start.
    pub bin: Option<PathBuf>,
}

impl Agent {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            proc: None,
            http: String::new(),
            socket: PathBuf::new(),
            env: Vec::new(),
            prefix: Vec::new(),
            listen: "127.0.0.1:0".into(),
            bin: None,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A new agent, enrolled with `coord` as `id`.
    pub fn enrolled(coord: &Coord, id: &str) -> Self {
        let agent = Self::new();
        let out = agent.enroll(&coord.quic, &coord.token(), Some(id));
        assert!(out.status.success(), "enrolling {id}: {}", String::from_utf8_lossy(&out.stderr));
        agent
    }

    pub fn enroll(&self, coordinator: &str, token: &str, id: Option<&str>) -> Output {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["enroll", "--coordinator", coordinator, "--token", token, "--data-dir"]).arg(self.data());
        if let Some(id) = id {
            cmd.args(["--device-id", id]);
        }
        cmd.output().unwrap()
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// The generation the running agent read from its disk at start (its
    /// own log says; the coordinator may still hold an older process's).
    pub fn restored_generation(&self) -> u64 {
        let newest = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: u64 = name.strip_prefix("agent-")?.strip_suffix(".log")?.parse().ok()?;
                Some((n, e.path()))
            })
            .max()
            .expect("an agent log");
        let log = std::fs::read_to_string(&newest.1).unwrap();
        let line = log.lines().find(|l| l.contains("agent state restored")).expect("the agent logs its restored state");
        let g = line.split("generation=").nth(1).expect("generation=").trim();
        g.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    }

    pub fn start_with(&mut self, extra: &[&str]) {
        let _ = std::fs::remove_file(self.data().join("api.json"));
        let data = self.data();
        let listen = self.listen.clone();
        let mut args = vec!["run", "--data-dir", data.to_str().unwrap(), "--listen", &listen];
        args.extend_from_slice(extra);
        let n = LOGS.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("agent-{n:03}.log"));
        let bin = self.bin.clone().unwrap_or_else(agent_bin);
        self.proc = Some(spawn_through(&self.prefix, &bin, &args, &log, &self.env));
        let api: Value = wait_for("agent start", Duration::from_secs(20), || {
            serde_json::from_slice(&std::fs::read(self.data().join("api.json")).ok()?).ok()
        });
        self.http = format!("http://{}", api["http"].as_str().unwrap());
        self.socket = PathBuf::from(api["socket"].as_str().unwrap());
    }

    /// Every log of every start, oldest first.
    pub fn logs(&self) -> String {
        logs_in(self.dir.path())
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().unwrap().pid()
    }

    fn client() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent()
    }

    pub fn models(&self) -> Value {
        Self::client().get(format!("{}/v1/models", self.http)).call().unwrap().body_mut().read_json().unwrap()
    }

    /// Waits until `name:version` answers requests, committed or on probation.
    pub fn wait_answering(&self, name: &str, version: u64) {
        wait_for(&format!("{name}:{version} answering"), Duration::from_secs(30), || {
            self.models()["models"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == name && m["version"] == version && m["state"] == "serving")
                .then_some(())
        })
    }

    /// Waits until `name:version` serves, committed (past probation; an
    /// agent from before staged updates does not say, and counts).
    pub fn wait_serving(&self, name: &str, version: u64) {
        wait_for(&format!("{name}:{version} serving"), Duration::from_secs(30), || {
            self.models()["models"]
                .as_array()?
                .iter()
                .any(|m| {
                    m["name"] == name
                        && m["version"] == version
                        && m["state"] == "serving"
                        && m.get("update").is_none_or(|u| u == "committed")
                })
                .then_some(())
        })
    }

    /// GETs a JSON answer; returns status and it.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut resp = Self::client().get(format!("{}{path}", self.http)).call().unwrap();
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap())
    }

    /// POSTs raw bytes; returns status and the JSON answer.
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let mut resp = Self::client()
            .post(format!("{}{path}", self.http))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap())
    }

    /// POSTs a binary tensor body; returns status, content type and body.
    pub fn post_tensors(&self, path: &str, tensors: &[tern_proto::Tensor]) -> (u16, String, Vec<u8>) {
        let (status, ct, body, _) = self.post_tensors_timed(path, tensors);
        (status, ct, body)
    }

    /// The same, with the answer's Server-Timing header.
    pub fn post_tensors_timed(&self, path: &str, tensors: &[tern_proto::Tensor]) -> (u16, String, Vec<u8>, String) {
        let body = tern_proto::encode_tensors(tensors).unwrap();
        let mut resp = Self::client()
            .post(format!("{}{path}", self.http))
            .header("content-type", tern_proto::TENSORS_MEDIA_TYPE)
            .send(&body[..])
            .unwrap();
        let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let (ct, timing) = (header("content-type"), header("server-timing"));
        (resp.status().as_u16(), ct, resp.body_mut().with_config().limit(1 << 30).read_to_vec().unwrap(), timing)
    }

    /// The same over the Unix socket, speaking HTTP/1.1 by hand.
    pub fn post_unix(&self, path: &str, body: &str) -> (u16, Value) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        // The body may arrive chunked; take the JSON object inside.
        let start = rest.find('{').unwrap();
        let end = rest.rfind('}').unwrap();
        (status, serde_json::from_str(&rest[start..=end]).unwrap())
    }
}
