//! Which version of the extension's schema a database has, and whether this library serves
//! it. A new library is loaded by a restart, before anyone has run `ALTER EXTENSION pg_queue
//! UPDATE`: it must keep serving the schema of every release it can be upgraded from, or
//! refuse it clearly (README "Upgrading").

use super::transaction;
use pgrx::prelude::*;

/// Schema versions this library runs against: the released ones it can be updated from (an
/// update script `sql/pg_queue--A--B.sql` leads from each) and its own.
const SERVED: &[&str] = &["0.1.0", env!("CARGO_PKG_VERSION")];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// No `CREATE EXTENSION pg_queue` in this database (or it is being dropped).
    Missing,
    /// Installed at a version this library serves.
    Served(String),
    /// Installed at a version this library does not know (a newer release's schema, with
    /// an older library): nothing runs until the library matches.
    Unknown(String),
}

impl Schema {
    /// Whether the objects added by `version` exist: work that needs them waits for the
    /// update.
    pub fn has(&self, version: &str) -> bool {
        match self {
            Schema::Served(v) => version_key(v) >= version_key(version),
            _ => false,
        }
    }
}

pub fn current() -> Schema {
    let found = transaction(|| {
        Spi::get_one::<String>(
            "SELECT e.extversion FROM pg_catalog.pg_extension e
              WHERE e.extname = 'pg_queue' AND pg_catalog.to_regclass('queue.jobs') IS NOT NULL",
        )
        .ok()
        .flatten()
    })
    .ok()
    .flatten();
    match found {
        None => Schema::Missing,
        Some(v) if SERVED.contains(&v.as_str()) => Schema::Served(v),
        Some(v) => Schema::Unknown(v),
    }
}

/// The library's own version: the one `CREATE EXTENSION` installs by default.
pub fn library() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// "0.10.2" → [0, 10, 2], so that versions compare as numbers.
fn version_key(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        assert!(version_key("0.10.0") > version_key("0.9.1"));
        assert!(Schema::Served("0.2.0".into()).has("0.1.0"));
        assert!(!Schema::Served("0.1.0".into()).has("0.2.0"));
        assert!(!Schema::Unknown("9.0.0".into()).has("0.1.0"));
    }
}
