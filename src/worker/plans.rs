//! SPI plans prepared once per process and kept (`SPI_keepplan`), so that the executor's
//! statements and each queue's handler call are parsed and planned once, not per batch or
//! per job. Postgres' plan cache revalidates a kept plan when what it depends on changes
//! (a handler replaced, a table altered), so keeping them is safe.

use super::SqlError;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// More distinct statements than this (handlers of many queues come and go) and the cache
/// starts over rather than growing without bound.
const MAX_KEPT: usize = 256;

thread_local! {
    static KEPT: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// The kept plan of `sql` with parameters of `types`, prepared on first use.
pub fn kept(
    client: &SpiClient<'_>,
    sql: &str,
    types: &[PgOid],
) -> Result<Rc<OwnedPreparedStatement>, SqlError> {
    if let Some(plan) = KEPT.with_borrow(|k| k.get(sql).cloned()) {
        return Ok(plan);
    }
    let plan = Rc::new(client.prepare_mut(sql, types)?.keep());
    KEPT.with_borrow_mut(|k| {
        if k.len() >= MAX_KEPT {
            k.clear();
        }
        k.insert(sql.to_string(), Rc::clone(&plan));
    });
    Ok(plan)
}
