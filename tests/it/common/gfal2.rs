//! The real gfal2 client, as FTS uses it, for the tape REST facade's tests: Debian's gfal2
//! library and HTTP plugin driven through its Python bindings by
//! `tests/it/fixtures/gfal2_client.py`, which documents the input and the results.
//!
//! The bindings are a Debian package for the system Python, so the script runs under
//! `/usr/bin/python3` whatever `python3` is first on `PATH`. When the packages are missing
//! the test fails naming them; it is never skipped.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The interpreter the Debian bindings (`python3-gfal2`) are built for.
pub const PYTHON: &str = "/usr/bin/python3";

/// What a machine needs for these tests.
pub const PACKAGES: &str = "python3-gfal2 gfal2-plugin-http";

/// How long one run may take before it is killed: its own polling loops and gfal2's request
/// timeouts end well before this, so reaching it means something hangs.
const LIMIT: Duration = Duration::from_secs(300);

/// The client script (tests/it is the `staged` package's, whose manifest is in host/).
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/it/fixtures/gfal2_client.py")
}

/// Runs the ops of `input` (`{"ops": [...], "bearer"?, "insecure"?, "ca_dir"?}`) through
/// gfal2 and returns its results, one per op and in order, as a JSON array. A gfal2 error is a
/// result, never a panic; this panics when gfal2 is missing, when the input is refused, and
/// when the client dies or hangs.
///
/// It blocks: a test whose server runs on the same tokio runtime calls [`run_async`].
pub fn run(input: &Value) -> Value {
    assert!(
        std::path::Path::new(PYTHON).exists(),
        "{PYTHON} is missing: the gfal2 tests need Debian's {PACKAGES} \
         (apt-get install {PACKAGES})"
    );
    let mut child = Command::new(PYTHON)
        .arg(script())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {PYTHON} {}: {e}", script().display()));
    let mut stdin = child.stdin.take().unwrap();
    let body = serde_json::to_vec(input).unwrap();
    // Written from a thread of its own so that a large input cannot block against a full
    // stdout pipe.
    let writer = thread::spawn(move || stdin.write_all(&body));
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());

    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let Some(status) = status else {
        panic!(
            "the gfal2 client ran past {LIMIT:?} and was killed\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    };
    match status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "the gfal2 tests need Debian's {PACKAGES} (apt-get install {PACKAGES}): {stderr}"
        ),
        Some(2) => panic!("the gfal2 client refused its input {input}: {stderr}"),
        _ => panic!("the gfal2 client failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    }
    let results: Vec<Value> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("the gfal2 client printed {line:?}, not JSON: {e}"))
        })
        .collect();
    let ops = input["ops"].as_array().map_or(0, Vec::len);
    assert_eq!(
        results.len(),
        ops,
        "the gfal2 client gave {} results for {ops} ops\nstdout:\n{stdout}\nstderr:\n{stderr}",
        results.len()
    );
    Value::Array(results)
}

/// [`run`] on tokio's blocking pool, so that a server on the caller's runtime keeps serving
/// gfal2's requests.
pub async fn run_async(input: Value) -> Value {
    tokio::task::spawn_blocking(move || run(&input))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The per-file states of one result (`"online"`, `"pending"`, `"error"`, ...), in URL order.
pub fn states(result: &Value) -> Vec<String> {
    result["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files in the gfal2 result {result}"))
        .iter()
        .map(|f| f["state"].as_str().unwrap().to_string())
        .collect()
}

fn reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}
