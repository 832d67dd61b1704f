//! The local API against clients that are slow, greedy or hostile: a
//! request is only ever allowed what its model's signature allows, bodies
//! too large for it are refused before they are read, and slow clients can
//! neither lock out other apps nor hold memory for long.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(agent: &Agent) -> TcpStream {
    let s = TcpStream::connect(agent.http.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends the head of a predict request with `content_length`, and returns
/// the connection.
fn head(agent: &Agent, model: &str, content_length: usize) -> TcpStream {
    let mut s = connect(agent);
    write!(
        s,
        "POST /v1/models/{model}:predict HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    )
    .unwrap();
    s
}

/// Reads an answer's status line (and as much as came with it).
fn status_of(s: &mut TcpStream) -> (u16, String) {
    let mut buf = vec![0u8; 64 << 10];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn a_request_that_would_need_gigabytes_gets_413_and_the_agent_stays_small() {
    let (_coord, agent) = serving(&["--max-batch", "64"], "iris.onnx", "iris");
    let before = peak_rss_kib(agent.pid());

    // 60 MiB declared for a model that takes 64 rows of 4 floats: refused
    // at once, before a byte of the body is read.
    let started = Instant::now();
    let mut s = head(&agent, "iris", 60 << 20);
    let (status, text) = status_of(&mut s);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("exceeds the") && text.contains("bytes this model's inputs can take"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    // The same without a length (chunked): refused once the limit is passed.
    let mut s = connect(&agent);
    write!(
        s,
        "POST /v1/models/iris:predict HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = format!(r#"{{"inputs":[{{"shape":[1000000,4],"data":[{}"#, "1.5,".repeat(4000));
    let mut sent = 0usize;
    let answer = loop {
        if write!(s, "{:x}\r\n{chunk}\r\n", chunk.len()).is_err() {
            break status_of(&mut s);
        }
        sent += chunk.len();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = s.read(&mut buf)
            && n > 0
        {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            break (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text);
        }
        assert!(sent < 64 << 20, "64 MiB sent and no answer");
    };
    assert_eq!(answer.0, 413, "{}", answer.1);
    assert!(sent < 1 << 20, "the agent read {sent} bytes of a body it could not take");

    // Within the byte limit, but a shape that would allocate a gigabyte.
    let (status, e) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[100000000,4],"data":[]}]}"#);
    assert_eq!(status, 413, "{e}");
    // A batch over the maximum, however it is sent.
    let rows = vec!["[1,2,3,4]"; 65].join(",");
    let (status, e) =
        agent.post("/v1/models/iris:predict", &format!(r#"{{"inputs":[{{"shape":[65,4],"data":[{rows}]}}]}}"#));
    assert_eq!(status, 413, "{e}");
    assert!(e["error"].as_str().unwrap().contains("a batch of 65 exceeds this agent's maximum batch of 64"), "{e}");
    let x = tern_proto::Tensor::new(vec![65, 4], tern_proto::TensorData::F32(vec![1.0; 260])).unwrap();
    assert_eq!(agent.post_tensors("/v1/models/iris:predict", &[x]).0, 413);
    // The largest batch it takes still works.
    let rows = vec!["[1,2,3,4]"; 64].join(",");
    let (status, a) =
        agent.post("/v1/models/iris:predict", &format!(r#"{{"inputs":[{{"shape":[64,4],"data":[{rows}]}}]}}"#));
    assert_eq!((status, a["outputs"][0]["shape"][0].as_u64()), (200, Some(64)), "{a}");

    // (The first release took a 60 MiB body like this one and peaked at 1.4 GB.)
    let grew = peak_rss_kib(agent.pid()) - before;
    assert!(grew < 16 << 10, "the agent's peak RSS grew by {} MiB", grew >> 10);
}

fn rows(n: usize) -> tern_proto::Tensor {
    tern_proto::Tensor::new(vec![n, 65536], tern_proto::TensorData::F32(vec![0.5; n * 65536])).unwrap()
}

/// Starts a binary predict request of `rows(n)` and sends `sent` bytes of
/// its body; returns the connection (the rest never comes).
fn hold_part_of(agent: &Agent, model: &str, n: usize, sent: usize) -> TcpStream {
    let body = tern_proto::encode_tensors(&[rows(n)]).unwrap();
    let mut s = connect(agent);
    write!(
        s,
        "POST /v1/models/{model}:predict HTTP/1.1\r\nHost: a\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        tern_proto::TENSORS_MEDIA_TYPE,
        body.len()
    )
    .unwrap();
    s.write_all(&body[..sent]).unwrap();
    s
}

#[test]
fn request_memory_is_shared_and_bounded_and_never_waited_for() {
    // wide.onnx takes rows of 65,536 floats (256 KiB each).
    let (_coord, agent) = serving(&["--request-memory-mb", "1"], "wide.onnx", "wide");
    let (status, _, body) = agent.post_tensors("/v1/models/wide:predict", &[rows(1)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Four rows: 1 MiB of body and 1 MiB decoded, more than the agent may hold.
    let (status, _, body) = agent.post_tensors("/v1/models/wide:predict", &[rows(4)]);
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 413, "{err}");
    assert!(err["error"].as_str().unwrap().contains("more than the agent's request memory of 1048576 bytes"), "{err}");

    // A client holds 700 KiB of a body it never finishes: a one-row request
    // (512 KiB with its decoded inputs) does not fit beside it, and is told
    // so at once instead of waiting (two such requests could otherwise
    // each hold half and wait for each other).
    let holder = hold_part_of(&agent, "wide", 3, 700 << 10);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (status, _, body) = agent.post_tensors("/v1/models/wide:predict", &[rows(1)]);
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Once it gives up, the memory is back.
    drop(holder);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.post_tensors("/v1/models/wide:predict", &[rows(1)]).0, 200);
}

#[test]
fn an_answer_nobody_reads_holds_its_memory_for_10_s_at_most() {
    // echo.onnx answers with its input: 64 rows are 16 MiB in and 16 MiB
    // out. Over the Unix socket (whose buffers hold a few hundred KiB,
    // where loopback TCP may grow to 32 MiB) the answer cannot all be sent
    // while its client does not read.
    let (_coord, agent) = serving(&["--request-memory-mb", "40", "--max-batch", "64"], "echo.onnx", "echo");
    let body = tern_proto::encode_tensors(&[rows(64)]).unwrap();
    let mut reader_that_never_reads = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    write!(
        reader_that_never_reads,
        "POST /v1/models/echo:predict HTTP/1.1\r\nHost: a\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        tern_proto::TENSORS_MEDIA_TYPE,
        body.len()
    )
    .unwrap();
    reader_that_never_reads.write_all(&body).unwrap();
    // Until it has run and its answer is being written.
    std::thread::sleep(Duration::from_secs(3));
    // Its answer holds 16 MiB until sent; another 64 rows (32 MiB with the
    // decoded inputs) do not fit beside it in 40...
    let started = Instant::now();
    let second = agent.post_tensors("/v1/models/echo:predict", &[rows(64)]).0;
    assert_eq!(second, 503, "{}", agent.logs().lines().rev().take(15).collect::<Vec<_>>().join("\n"));
    // ...until the stuck write is given up (10 s), and the room comes back.
    let ok = wait_for("the stuck answer's memory", Duration::from_secs(20), || {
        (agent.post_tensors("/v1/models/echo:predict", &[rows(64)]).0 == 200).then_some(started.elapsed())
    });
    assert!(ok >= Duration::from_secs(5), "the room came back after {ok:?}, before the write deadline");
    drop(reader_that_never_reads);
}

#[test]
fn connection_churn_does_not_pile_up_threads() {
    let (_coord, agent) = serving(&[], "iris.onnx", "iris");
    let threads = || proc_status(agent.pid(), "Threads");
    let before = threads();
    // 400 clients, one after another, each leaving a half-sent request.
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut s = head(&agent, "iris", 100);
        s.write_all(b"{").unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let most = threads();
    assert!(most <= before + 64 + 8, "{before} threads before, {most} with 400 half-sent requests");
    let (status, _) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#);
    assert_eq!(status, 200);
}

#[test]
fn slow_clients_cannot_lock_out_other_apps() {
    let (_coord, agent) = serving(&[], "iris.onnx", "iris");
    let body = r#"{"inputs":[{"name":"X","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

    // A keep-alive client that goes idle after one answer.
    let mut idle = connect(&agent);
    write!(idle, "POST /v1/models/iris:predict HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    assert_eq!(status_of(&mut idle).0, 200);

    // 70 clients that send a request head and a byte of body, then nothing:
    // more than the 64 connection slots of the listener.
    let started = Instant::now();
    let mut tricklers: Vec<TcpStream> = (0..70)
        .map(|_| {
            let mut s = head(&agent, "iris", body.len());
            s.write_all(b"{").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // A normal app still gets its answer, at once, over and over.
    for _ in 0..5 {
        let t = Instant::now();
        let (status, answer) = agent.post("/v1/models/iris:predict", body);
        assert_eq!(status, 200, "{answer}");
        assert!(t.elapsed() < Duration::from_secs(2), "answered after {:?}", t.elapsed());
    }
    // A body declared far beyond the limit is refused at once, unread.
    let mut greedy = head(&agent, "iris", 1 << 30);
    assert_eq!(status_of(&mut greedy).0, 413);

    // The tricklers: the oldest were closed to make room; the others are
    // answered 408 once their body deadline (10 s) passes.
    let (mut timed_out, mut closed) = (0, 0);
    for s in &mut tricklers {
        match status_of(s) {
            (408, _) => timed_out += 1,
            (0, _) => closed += 1,
            (other, text) => panic!("a trickling client got {other}: {text}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_eq!(timed_out + closed, 70);
    assert!(timed_out > 0 && closed > 0, "{timed_out} timed out, {closed} closed");
    // The idle keep-alive connection was closed too (10 s without a request).
    assert_eq!(status_of(&mut idle).0, 0, "an idle connection stayed open");
}
