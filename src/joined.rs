//! Short texts joined without a heap buffer: the per-change keys and names (room names, event ids, owner-book keys) that are only looked up or copied once into shared text.

/// Longest join kept on the stack; longer ones go through a `String`.
const STACK: usize = 512;

/// Calls `f` with `parts` joined. Per change, `format!` grew a `String` only for it to be
/// hashed or copied again; a join that fits is written on the stack instead.
pub(crate) fn with_joined<T>(parts: &[&str], f: impl FnOnce(&str) -> T) -> T {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len <= STACK {
        let mut buf = [0u8; STACK];
        let mut at = 0;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p.as_bytes());
            at += p.len();
        }
        // Whole `str`s joined end to end are UTF-8: the check cannot fail.
        if let Ok(text) = std::str::from_utf8(&buf[..len]) {
            return f(text);
        }
    }
    f(&parts.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_is_the_parts_end_to_end_at_any_length() {
        for parts in [
            vec![],
            vec!["store", ":", "s1"],
            vec!["é", "\u{0}", "ü"],
            vec!["x"; STACK],
            vec!["y"; STACK + 1],
        ] {
            assert_eq!(with_joined(&parts, str::to_owned), parts.concat());
        }
    }
}
