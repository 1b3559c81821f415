//! Metrics: the launcher rolls up each minute's events per queue (`queue.roll_up_metrics`
//! in sql/metrics.sql) once the minute is 5 seconds over, so that a commit that ends just
//! after the minute is still in it; later ones are caught by rolling the last 5 minutes up
//! again each time.

use super::{transaction, SqlError};
use pgrx::prelude::*;
use std::time::{SystemTime, UNIX_EPOCH};

/// The schema version that has the rollup tables (README "Upgrading").
pub const SINCE: &str = "0.2.0";

const ROLL_UP_SQL: &str = "
SELECT queue.roll_up_metrics(date_trunc('minute', clock_timestamp() - interval '5 seconds'))";

/// Rolls up when a new minute is due; `last` is the minute (Unix seconds / 60) last done.
pub fn roll_up_if_due(last: &mut Option<u64>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let due = now.saturating_sub(5) / 60;
    if *last == Some(due) {
        return;
    }
    // Its sorts (a minute's jobs, for the percentiles) fit in memory up to about a million
    // jobs. (JIT is off in every worker: pin_session_settings.)
    let result = transaction(|| {
        Spi::run("SET LOCAL work_mem = '64MB'")?;
        Spi::get_one::<i64>(ROLL_UP_SQL)
    });
    let result = result.map(|r| r.map_err(SqlError::from));
    match result {
        Ok(Ok(_)) => *last = Some(due),
        Ok(Err(e)) | Err(e) => log!("pg_queue launcher: rolling up metrics failed: {e}"),
    }
}
