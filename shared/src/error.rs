//! What the crate's error types share: a boxed cause, and an error shown with its sources.

use std::fmt;

/// A cause of any type (a driver's, redb's, serde's error, or a message), shareable between the
/// callers of one failed batch.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Makes a [`Cause`]: from an error value, or from a message (`&str`, `String`) when there is
/// no error value to keep.
pub fn cause(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Cause {
    Cause::from(e.into())
}

/// Displays an error followed by its sources, `outer: inner: innermost`, on one line (a
/// source's message already contained in an outer one is not repeated). For logs.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown: Vec<String> = Vec::new();
        let mut next = Some(self.0);
        while let Some(err) = next {
            let text = err.to_string();
            if !text.is_empty() && !shown.iter().any(|s| s.contains(&text)) {
                if !shown.is_empty() {
                    f.write_str(": ")?;
                }
                f.write_str(&text)?;
                shown.push(text);
            }
            next = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_shows_every_source_once() {
        let e = Outer(std::io::Error::other("permission denied"));
        assert_eq!(Chain(&e).to_string(), "cannot open the store: permission denied");
        let c = cause("just a message");
        assert_eq!(Chain(&*c).to_string(), "just a message");
    }
}
