//! A deliberately misbehaving adapter, for the host's containment tests only.
//!
//! Its exports behave well unless told otherwise, so the host can load it; the argument
//! picks the misbehaviour:
//! - `resolve-observation` with `{"do": MODE}`, and `map-event-paths` with the single name
//!   MODE, where MODE is `loop` (never returns), `bomb` (allocates without end), `trap`
//!   (panics), `forbidden-http` (GETs a host outside any allow-list and reports what the
//!   host answered), `huge` (returns 4 MiB), `wrong-count` (answers a batch with the
//!   wrong number of entries), `fs`, `env`, `socket`, `clock` (reach for what the sandbox
//!   withholds and report what they got).
//! - The setting `info` = `loop` makes `info` itself hang, so loading (or reloading) fails.

wit_bindgen::generate!({ path: "../../../wit", world: "adapter" });

use staging::adapter::host;

struct Hostile;

fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop away.
        x = core::hint::black_box(x.wrapping_add(1));
    }
}

fn bomb() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        core::hint::black_box(&hoard);
    }
}

fn misbehave(mode: &str) -> Option<Vec<String>> {
    match mode {
        "loop" => spin(),
        "bomb" => bomb(),
        "trap" => panic!("the hostile adapter panics on purpose"),
        "forbidden-http" => {
            let answer = host::http_get("http://forbidden.example.net/steal");
            Some(vec![match answer {
                Ok(r) => format!("fetched: HTTP {}", r.status),
                Err(e) => format!("refused: {e}"),
            }])
        }
        "huge" => Some(vec!["x".repeat(1 << 20); 4]),
        // Reaching for what the sandbox withholds; each reports what it got.
        "fs" => Some(vec![match std::fs::read_to_string("/etc/passwd") {
            Ok(_) => "read /etc/passwd".into(),
            Err(e) => format!("refused: {e}"),
        }]),
        "env" => Some(vec![format!("env vars: {}", std::env::vars_os().count())]),
        "socket" => Some(vec![match std::net::TcpStream::connect("127.0.0.1:80") {
            Ok(_) => "connected".into(),
            Err(e) => format!("refused: {e}"),
        }]),
        "clock" => Some(vec![format!(
            "now: {:?}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        )]),
        _ => None,
    }
}

impl Guest for Hostile {
    fn info() -> Info {
        if host::settings().contains(r#""info":"loop""#) {
            spin();
        }
        Info {
            name: "hostile".into(),
            version: "0.0.0".into(),
            telescope: "none (test adapter)".into(),
        }
    }

    fn observation_schema() -> String {
        r#"{"type": "object", "properties": {"do": {"type": "string"}}, "required": ["do"]}"#.into()
    }

    fn resolve_observation(obs: String) -> Result<Vec<String>, ResolveError> {
        let mode = obs
            .split('"')
            .nth(3)
            .map(str::to_string)
            .unwrap_or_default();
        misbehave(&mode).ok_or(ResolveError::Invalid(format!("unknown mode {mode:?}")))
    }

    fn map_event_paths(names: Vec<String>) -> Vec<Option<String>> {
        if names.len() == 1 {
            if names[0] == "wrong-count" {
                return vec![None, None];
            }
            if let Some(out) = misbehave(&names[0]) {
                return out.into_iter().map(Some).collect();
            }
        }
        names.into_iter().map(Some).collect()
    }

    fn stage_paths(paths: Vec<String>) -> Vec<String> {
        paths
    }

    fn failure_report(job: JobSummary) -> String {
        format!("job {}", job.job_id)
    }

    fn callback_comment(job: JobSummary) -> String {
        format!("job {}", job.job_id)
    }
}

export!(Hostile);
