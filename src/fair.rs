//! Fair share's rotation (sql/fair.sql): each process remembers, per queue, the last key
//! its claims reached, and its next claim starts after it, so keys take turns. A process
//! of its own is enough: keys are served in order by every claimer, and two claimers
//! serving different keys at once is more fairness, not less.

use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static CURSORS: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
}

/// Where the next claim of `queue` starts (after this key; '' before the first).
pub fn cursor(queue: &str) -> String {
    CURSORS.with_borrow(|c| c.get(queue).cloned().unwrap_or_default())
}

/// After a claim from `queue` took jobs of `keys`: the rotation moves past the last key
/// the claim reached, in key order from the old cursor, wrapping around.
pub fn advance(queue: &str, keys: &[String]) {
    let old = cursor(queue);
    let after = keys.iter().filter(|k| **k > old).max();
    let wrapped = keys.iter().filter(|k| **k <= old).max();
    if let Some(next) = wrapped.or(after) {
        let next = next.clone();
        CURSORS.with_borrow_mut(|c| c.insert(queue.to_string(), next));
    }
}

/// Internal (claim): this backend's rotation cursor for `queue`.
#[pg_extern(volatile)]
fn fair_cursor(queue: &str) -> String {
    cursor(queue)
}

/// Internal (claim): moves this backend's cursor for `queue` past the keys it claimed.
#[pg_extern(volatile)]
fn fair_advance(queue: &str, keys: Option<Vec<Option<String>>>) {
    let keys: Vec<String> = keys.unwrap_or_default().into_iter().flatten().collect();
    advance(queue, &keys);
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.fair_cursor(text) IS 'Internal: where this process''s next claim of a fair_share queue starts in key order.';
COMMENT ON FUNCTION queue.fair_advance(text, text[]) IS 'Internal: moves this process''s rotation past the keys a claim took.';
"#,
    name = "fair_comments",
    requires = [fair_cursor, fair_advance]
);

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn the_cursor_moves_past_the_last_key_reached_and_wraps() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(super::cursor("t"), "");
        super::advance("t", &k(&["b", "a", "c"]));
        assert_eq!(super::cursor("t"), "c");
        super::advance("t", &k(&["d", "a"])); // reached d, wrapped to a
        assert_eq!(super::cursor("t"), "a");
        super::advance("t", &[]);
        assert_eq!(super::cursor("t"), "a");
    }
}
