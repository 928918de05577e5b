//! One way to turn an error and its causes into one line of text, for logs, callbacks and
//! `/get_stats/`.
//!
//! Invariant: the text is one line per cause joined by ": ", a cause repeating the one
//! before it is dropped, and the whole is at most [`MAX_LEN`] bytes (cut on a character
//! boundary), whatever the error says.

use std::error::Error;

/// Longest text made.
pub const MAX_LEN: usize = 1000;

/// `e` and the chain of its sources.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    join(std::iter::successors(Some(e), |&e| e.source()))
}

/// A chain of errors given as an iterator (e.g. `wasmtime::Error::chain`).
pub fn join<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut parts: Vec<String> = chain
        .into_iter()
        .map(|c| c.to_string().lines().next().unwrap_or("").to_string())
        .filter(|l| !l.is_empty())
        .collect();
    parts.dedup();
    let mut msg = parts.join(": ");
    if msg.len() > MAX_LEN {
        msg.truncate(msg.floor_char_boundary(MAX_LEN));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn joins_causes_on_one_line() {
        let e = E(
            "request failed",
            Some(Box::new(E(
                "connect\nsecond line",
                Some(Box::new(E("refused", None))),
            ))),
        );
        assert_eq!(chain(&e), "request failed: connect: refused");
    }

    #[test]
    fn drops_repeats_and_bounds_the_length() {
        let e = E("same", Some(Box::new(E("same", None))));
        assert_eq!(chain(&e), "same");
        let long: &'static str = "é".repeat(800).leak();
        let t = chain(&E(long, None));
        assert!(t.len() <= MAX_LEN && t.starts_with('é'));
    }
}
